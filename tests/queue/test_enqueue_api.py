"""The queue's Enqueue RPCs refuse malformed requests with INVALID_ARGUMENT and store nothing.

Both shapes are covered: EnqueueMessage (one request, what ingress sends up
to 1 MiB) and the client-streaming Enqueue (envelope, then body chunks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from kurrier.v1 import queue_pb2, queue_pb2_grpc

from tests.support.nats import NatsServer
from tests.support.relay import ServiceRelay, message_records

BODY = b"Subject: api\r\n\r\nhello\r\n"


def envelope(queue_id: str = "APITEST000000001", **fields: object) -> queue_pb2.Envelope:
    values: dict[str, object] = {
        "queue_id": queue_id,
        "mail_from": "a@client.test",
        "recipients": ["r@example.com"],
        "size": len(BODY),
    }
    values.update(fields)
    return queue_pb2.Envelope(**values)  # type: ignore[arg-type]


@pytest.fixture
def queue(tmp_path: Path, nats_server: NatsServer) -> Iterator[ServiceRelay]:
    relay = ServiceRelay(tmp_path, nats_server.url)
    relay.start("queue")
    yield relay
    relay.__exit__()


async def _unary(address: str, request: queue_pb2.EnqueueMessageRequest) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        try:
            await stub.EnqueueMessage(request, timeout=20, wait_for_ready=True)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK


async def _streamed(address: str, requests: list[queue_pb2.EnqueueRequest]) -> grpc.StatusCode:
    async def each() -> AsyncIterator[queue_pb2.EnqueueRequest]:
        for request in requests:
            yield request

    async with grpc.aio.insecure_channel(address) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        try:
            await stub.Enqueue(each(), timeout=20, wait_for_ready=True)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(queue_pb2.EnqueueMessageRequest(body=BODY), id="no envelope"),
        pytest.param(
            queue_pb2.EnqueueMessageRequest(envelope=envelope("bad id!"), body=BODY),
            id="queue id outside its alphabet",
        ),
        pytest.param(
            queue_pb2.EnqueueMessageRequest(envelope=envelope(recipients=[]), body=BODY),
            id="no recipients",
        ),
        pytest.param(
            queue_pb2.EnqueueMessageRequest(envelope=envelope(), body=BODY + b"x"),
            id="body longer than the envelope says",
        ),
        pytest.param(
            queue_pb2.EnqueueMessageRequest(envelope=envelope(size=-1), body=b""),
            id="negative size",
        ),
    ],
)
def test_a_malformed_enqueue_message_is_refused(
    queue: ServiceRelay, nats_server: NatsServer, request_: queue_pb2.EnqueueMessageRequest
) -> None:
    code = asyncio.run(_unary(queue.queue_address, request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message_records(nats_server.url) == []


@pytest.mark.parametrize(
    "requests",
    [
        pytest.param([], id="empty stream"),
        pytest.param([queue_pb2.EnqueueRequest(chunk=BODY)], id="chunk before the envelope"),
        pytest.param(
            [
                queue_pb2.EnqueueRequest(envelope=envelope()),
                queue_pb2.EnqueueRequest(envelope=envelope()),
            ],
            id="a second envelope",
        ),
        pytest.param(
            [
                queue_pb2.EnqueueRequest(envelope=envelope()),
                queue_pb2.EnqueueRequest(chunk=BODY[:5]),
            ],
            id="body shorter than the envelope says",
        ),
    ],
)
def test_a_malformed_enqueue_stream_is_refused(
    queue: ServiceRelay, nats_server: NatsServer, requests: list[queue_pb2.EnqueueRequest]
) -> None:
    code = asyncio.run(_streamed(queue.queue_address, requests))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message_records(nats_server.url) == []


def test_both_shapes_store_a_well_formed_message(
    queue: ServiceRelay, nats_server: NatsServer
) -> None:
    unary = queue_pb2.EnqueueMessageRequest(envelope=envelope("APIUNARY00000001"), body=BODY)
    streamed = [
        queue_pb2.EnqueueRequest(envelope=envelope("APISTREAM0000001")),
        queue_pb2.EnqueueRequest(chunk=BODY[:7]),
        queue_pb2.EnqueueRequest(chunk=BODY[7:]),
    ]
    assert asyncio.run(_unary(queue.queue_address, unary)) == grpc.StatusCode.OK
    assert asyncio.run(_streamed(queue.queue_address, streamed)) == grpc.StatusCode.OK
    stored = {record.queue_id: record for record in message_records(nats_server.url)}
    assert sorted(stored) == ["APISTREAM0000001", "APIUNARY00000001"]
    assert all(record.size == len(BODY) for record in stored.values())
