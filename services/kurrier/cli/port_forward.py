"""A port-forward to a pod through the Kubernetes API server, as `kubectl port-forward` makes it.

Each local connection is one WebSocket to the pod's `portforward`
subresource (protocol `v4.channel.k8s.io`), opened with the caller's own
credentials, so the API server's RBAC decides who may reach the pod: a
WebSocket forward is a GET, authorized as `get` and `create` on
`pods/portforward`. On that WebSocket every binary frame starts
with its channel: 0 carries the port's data both ways, 1 the kubelet's
errors; the first frame of each channel is the port number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

log = logging.getLogger(__name__)

PORT_FORWARD_PROTOCOL = "v4.channel.k8s.io"
DATA, ERROR = 0, 1
CHUNK = 64 * 1024


class PortForwardError(Exception):
    """The API server or the kubelet refused the forward; str() says why."""


class PodPortForward:
    """Local connections to 127.0.0.1:<local_port>, each forwarded to the pod's port."""

    def __init__(self, session: aiohttp.ClientSession, server: str, namespace: str, pod: str):
        self._session = session
        self._url = f"{server.rstrip('/')}/api/v1/namespaces/{namespace}/pods/{pod}/portforward"
        self._pod = f"{namespace}/{pod}"
        self._server: asyncio.Server | None = None

    async def open(self, port: int) -> int:
        """Check that the API server lets the caller forward to the port; serve it locally."""
        websocket = await self._connect(port)
        await websocket.close()
        self._server = await asyncio.start_server(
            lambda reader, writer: self._pipe(port, reader, writer), "127.0.0.1", 0
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connect(self, port: int) -> aiohttp.ClientWebSocketResponse:
        try:
            return await self._session.ws_connect(
                self._url, params={"ports": str(port)}, protocols=(PORT_FORWARD_PROTOCOL,)
            )
        except aiohttp.WSServerHandshakeError as error:
            reason = await self._reason(port)
            raise PortForwardError(
                f"port-forward to {self._pod}: the API server answered {error.status}"
                f"{_hint(error.status)}{': ' + reason if reason else ''}"
            ) from None
        except (aiohttp.ClientError, OSError) as error:
            raise PortForwardError(f"port-forward to {self._pod}: {error}") from None

    async def _reason(self, port: int) -> str:
        """Why the API server refuses: the message of its Status, which a refused
        WebSocket handshake does not pass on, asked for again without the upgrade."""
        try:
            async with self._session.get(self._url, params={"ports": str(port)}) as response:
                status = await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError):
            return ""
        return str(status.get("message", "")) if isinstance(status, dict) else ""

    async def _pipe(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            websocket = await self._connect(port)
        except PortForwardError as error:
            log.warning("%s", error)
            writer.close()
            return
        upstream = asyncio.create_task(_upstream(reader, websocket))
        try:
            await self._downstream(websocket, writer)
        finally:
            upstream.cancel()
            await websocket.close()
            writer.close()

    async def _downstream(
        self, websocket: aiohttp.ClientWebSocketResponse, writer: asyncio.StreamWriter
    ) -> None:
        started: set[int] = set()
        async for frame in websocket:
            if frame.type != aiohttp.WSMsgType.BINARY or not frame.data:
                continue
            channel, payload = frame.data[0], frame.data[1:]
            if channel not in started:
                started.add(channel)  # the port number, once per channel
                continue
            if channel == DATA:
                writer.write(payload)
                await writer.drain()
            elif channel == ERROR and payload:
                log.warning("port-forward to %s: %s", self._pod, payload.decode(errors="replace"))


async def _upstream(
    reader: asyncio.StreamReader, websocket: aiohttp.ClientWebSocketResponse
) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(CHUNK):
            await websocket.send_bytes(bytes([DATA]) + data)


def _hint(status: int) -> str:
    if status == 403:
        return " (RBAC: the caller needs get and create on pods/portforward)"
    if status == 401:
        return " (the kubeconfig's credentials were not accepted)"
    return ""
