"""The plugin's port-forward (cli/port_forward.py): the request it makes, and the data
it carries both ways over the v4.channel.k8s.io protocol.

The test API server (tests/support/kube.py) runs no kubelet, so it cannot forward
to a pod: test_kubectl_plugin.py follows a forward through it up to RBAC and the
API server's 400 for want of a node. Past that point the API server only relays
the kubelet's frames, so here an aiohttp server stands in for the two together:
it records each request and answers as the kubelet does (the port number first
on each channel, then the pod's bytes on channel 0, its errors on channel 1),
with the pod's port an upper-casing echo.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from kurrier.cli.port_forward import PORT_FORWARD_PROTOCOL, PodPortForward

NAMESPACE, POD, PORT = "mail", "kurrier-queue-5d9c7-abcde", 7071
TOKEN = "Bearer the-callers-token"


@dataclass(frozen=True)
class Request:
    path: str
    query: dict[str, str]
    protocol: str
    authorization: str


async def _forwarding(requests: list[Request], request: web.Request) -> web.WebSocketResponse:
    requests.append(
        Request(
            request.path,
            dict(request.query),
            request.headers.get("Sec-WebSocket-Protocol", ""),
            request.headers.get("Authorization", ""),
        )
    )
    websocket = web.WebSocketResponse(protocols=(PORT_FORWARD_PROTOCOL,))
    await websocket.prepare(request)
    port = int(request.query["ports"]).to_bytes(2, "little")
    for channel in (0, 1):
        await websocket.send_bytes(bytes([channel]) + port)
    async for frame in websocket:
        if frame.type == aiohttp.WSMsgType.BINARY and frame.data[0] == 0:
            if frame.data[1:] == b"fail\n":
                await websocket.send_bytes(b"\x01the pod's port refused")
            await websocket.send_bytes(b"\x00" + frame.data[1:].upper())
    return websocket


async def _exchange(requests: list[Request]) -> tuple[bytes, bytes]:
    async def forwarding(request: web.Request) -> web.WebSocketResponse:
        return await _forwarding(requests, request)

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/{namespace}/pods/{pod}/portforward", forwarding)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": TOKEN}) as session:
            forward = PodPortForward(session, server, NAMESPACE, POD)
            local_port = await forward.open(PORT)
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", local_port)
                writer.write(b"hello\n")
                answer = await asyncio.wait_for(reader.readline(), 10)
                writer.write(b"fail\n")
                after_error = await asyncio.wait_for(reader.readline(), 10)
                writer.close()
            finally:
                await forward.close()
    finally:
        await runner.cleanup()
    return answer, after_error


def test_each_connection_is_a_websocket_to_the_pods_portforward_as_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    requests: list[Request] = []
    with caplog.at_level(logging.WARNING, logger="kurrier.cli.port_forward"):
        answer, after_error = asyncio.run(_exchange(requests))
    # The bytes went to the pod's port and back; the port-number frames were not data.
    assert (answer, after_error) == (b"HELLO\n", b"FAIL\n")
    # One request checks the caller may forward, one more carries the connection.
    expected = Request(
        f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}/portforward",
        {"ports": str(PORT)},
        PORT_FORWARD_PROTOCOL,
        TOKEN,
    )
    assert requests == [expected, expected]
    # What the kubelet says on the error channel is told, not passed on as data.
    assert f"port-forward to {NAMESPACE}/{POD}: the pod's port refused" in caplog.messages
