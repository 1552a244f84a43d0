"""Ingress's shared EnqueueMessages stream against a real queue service (in this process).

The queue runs in-process here so the test can stop and replace it between
two messages of one client; its messages are stored in the real NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import grpc
import pytest
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.core.records import RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.ingress.enqueue_stream import EnqueueStream, StreamEnded
from kurrier.ingress.queue_client import QueueClient, QueueUnavailable
from kurrier.queue.manager import QueueManager
from kurrier.queue.retry_schedule import RetrySchedule
from kurrier.queue.service import QueueService
from kurrier.v1 import queue_pb2, queue_pb2_grpc
from nats.js import JetStreamContext

from tests.support.nats import NatsServer
from tests.support.processes import free_port

BODY = b"Subject: stream\r\n\r\none of many\r\n"


def _envelope() -> queue_pb2.Envelope:
    return queue_pb2.Envelope(
        queue_id=uuid.uuid4().hex[:20],
        mail_from="a@client.test",
        recipients=["r@example.com"],
        size=len(BODY),
    )


async def _serve(js: JetStreamContext, port: int = 0) -> tuple[grpc.aio.Server, QueueService, int]:
    records = await RecordStore.open(js)
    manager = QueueManager(js, records, TableFollower(), RetrySchedule(), "relay.test")
    service = QueueService(js, records, manager)
    server = grpc.aio.server()
    queue_pb2_grpc.add_QueueServiceServicer_to_server(service, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, service, port


async def _stop(server: grpc.aio.Server, service: QueueService) -> None:
    service.close_streams()
    await server.stop(grace=10)


async def _many_then_a_replaced_queue(nats_url: str) -> tuple[list[str], list[str], bool]:
    nc = await connect(nats_url, "test-stream")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        records = await RecordStore.open(js)
        server, service, port = await _serve(js)
        client = QueueClient(f"127.0.0.1:{port}")
        try:
            envelopes = [_envelope() for _ in range(50)]
            answered = await asyncio.gather(*(client.enqueue(e, [BODY]) for e in envelopes))
            # The queue stops (its stream ends cleanly) and a successor takes its
            # address: the same client carries on, on a new call.
            await _stop(server, service)
            server, service, _ = await _serve(js, port)
            later = _envelope()
            answered.append(await client.enqueue(later, [BODY]))
            await _stop(server, service)
            stored = [r.queue_id async for r in records.all()]
            expected = [e.queue_id for e in [*envelopes, later]]
            return sorted(answered), sorted(expected), sorted(stored) == sorted(expected)
        finally:
            await client.close()
    finally:
        await disconnect(nc)


def test_concurrent_messages_share_one_stream_and_survive_a_replaced_queue(
    nats_server: NatsServer,
) -> None:
    answered, expected, all_stored = asyncio.run(_many_then_a_replaced_queue(nats_server.url))
    assert answered == expected
    assert all_stored


async def _enqueue_to_a_closing_queue(nats_url: str) -> list[str]:
    nc = await connect(nats_url, "test-stream")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        server, service, port = await _serve(js)
        # Shutting down: every call it takes ends at once, unread.
        service.close_streams()
        client = QueueClient(f"127.0.0.1:{port}")
        try:
            with pytest.raises(QueueUnavailable, match="ending the call"):
                await client.enqueue(_envelope(), [BODY])
        finally:
            await client.close()
            await server.stop(grace=1)
        return [r.queue_id async for r in (await RecordStore.open(js)).all()]
    finally:
        await disconnect(nc)


def test_a_queue_that_ends_every_call_unread_gets_a_451_and_stores_nothing(
    nats_server: NatsServer,
) -> None:
    assert asyncio.run(_enqueue_to_a_closing_queue(nats_server.url)) == []


async def _a_queue_late_to_come_up(nats_url: str) -> tuple[str, str, bool]:
    stored = ""
    nc = await connect(nats_url, "test-stream")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        port = free_port()
        client = QueueClient(f"127.0.0.1:{port}", timeout=1)
        try:
            # Nothing listens yet: the message's deadline passes while its call
            # waits for the queue, in the middle of the write.
            first = _envelope()
            with pytest.raises(QueueUnavailable) as late:
                await client.enqueue(first, [BODY])
            server, service, _ = await _serve(js, port)
            try:
                # That call is abandoned, not left half-written: a later message gets
                # a fresh one. (Messages may still time out while the channel's
                # reconnect backoff runs; a poisoned stream would never succeed.)
                for _ in range(30):
                    with contextlib.suppress(QueueUnavailable):
                        stored = await client.enqueue(_envelope(), [BODY])
                        break
            finally:
                await _stop(server, service)
            records = await RecordStore.open(js)
            first_stored = await records.get(first.queue_id, fresh=True) is not None
            return str(late.value), stored, first_stored
        finally:
            await client.close()
    finally:
        await disconnect(nc)


def test_a_message_whose_deadline_cuts_its_write_short_does_not_poison_the_stream(
    nats_server: NatsServer,
) -> None:
    late, stored, first_stored = asyncio.run(_a_queue_late_to_come_up(nats_server.url))
    assert late.startswith("DEADLINE_EXCEEDED")
    assert len(stored) == 20
    # The client heard 451 for the first message and will send it again: its
    # abandoned call must not deliver it to the queue later on.
    assert not first_stored


async def _retired_with_messages_in_flight(nats_url: str) -> tuple[list[int], bool, list[str]]:
    nc = await connect(nats_url, "test-stream")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        server, service, port = await _serve(js)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stream = EnqueueStream(queue_pb2_grpc.QueueServiceStub(channel))
                envelopes = [_envelope() for _ in range(20)]
                sends = [
                    asyncio.create_task(
                        stream.send(queue_pb2.EnqueueMessageRequest(envelope=e, body=BODY))
                    )
                    for e in envelopes
                ]
                await asyncio.sleep(0)  # each send hands its message over, then waits
                # A renewed certificate retires the stream with all twenty unanswered.
                await stream.close_when_answered()
                answers = await asyncio.gather(*sends)
                ended = stream.ended is not None
        finally:
            await _stop(server, service)
        stored = [r.queue_id async for r in (await RecordStore.open(js)).all()]
        assert sorted(stored) == sorted(e.queue_id for e in envelopes)
        return [a.code for a in answers], ended, stored
    finally:
        await disconnect(nc)


def test_a_retired_stream_answers_what_it_carries_then_ends(nats_server: NatsServer) -> None:
    codes, ended, stored = asyncio.run(_retired_with_messages_in_flight(nats_server.url))
    assert codes == [grpc.StatusCode.OK.value[0]] * 20
    assert ended and len(stored) == 20


async def _a_stream_the_queue_ended(nats_url: str) -> tuple[bool, list[str]]:
    nc = await connect(nats_url, "test-stream")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        server, service, port = await _serve(js)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = EnqueueStream(queue_pb2_grpc.QueueServiceStub(channel))
            request = queue_pb2.EnqueueMessageRequest(envelope=_envelope(), body=BODY)
            await stream.send(request)
            await _stop(server, service)  # the queue goes: the call ends
            # Refused at once, or answered so as soon as the stream sees the end.
            with pytest.raises(StreamEnded):
                await stream.send(queue_pb2.EnqueueMessageRequest(envelope=_envelope(), body=BODY))
            await asyncio.sleep(0)  # the writer's cancellation runs
            left = [
                repr(task.get_coro())
                for task in asyncio.all_tasks()
                if "BatchWriter" in repr(task.get_coro())
            ]
            return stream.ended is not None, left
    finally:
        await disconnect(nc)


def test_a_stream_the_queue_ended_leaves_no_writer_waiting(nats_server: NatsServer) -> None:
    # A writer left waiting is collected pending once ingress drops the stream,
    # logged as "Task was destroyed but it is pending!" at every failover.
    ended, left = asyncio.run(_a_stream_the_queue_ended(nats_server.url))
    assert ended and left == []
