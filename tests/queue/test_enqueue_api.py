"""The queue's Enqueue RPCs refuse malformed requests with INVALID_ARGUMENT, and envelopes of
a newer kurrier.v1 with UNAVAILABLE, and store nothing.

Both shapes are covered: EnqueueMessages (whole messages on one call in
batches, what ingress sends up to 1 MiB, each answered on its own) and the
client-streaming Enqueue (envelope, then body chunks), whose refusal must reach a
client still sending its body.
"""

from __future__ import annotations

import asyncio
import signal
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


MALFORMED = [
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
    pytest.param(
        queue_pb2.EnqueueMessageRequest(
            envelope=envelope(recipients=["r@\u2603.example.com"]), body=BODY
        ),
        id="a recipient's domain IDNA 2008 refuses",
    ),
    pytest.param(
        queue_pb2.EnqueueMessageRequest(envelope=envelope(mail_from="a@xn--abc.test"), body=BODY),
        id="a sender's domain IDNA 2008 refuses",
    ),
]


@pytest.mark.parametrize("request_", MALFORMED)
def test_a_malformed_enqueue_message_is_refused(
    queue: ServiceRelay, nats_server: NatsServer, request_: queue_pb2.EnqueueMessageRequest
) -> None:
    [result] = asyncio.run(_on_one_stream(queue.queue_address, [[request_]]))
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert result.message
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


def _from_a_newer_client(envelope: queue_pb2.Envelope, dsn: bool = False) -> queue_pb2.Envelope:
    """envelope as a client of a newer kurrier.v1 sends it: with field 99 set, in the
    envelope itself or in its RecipientDsn."""
    newer_field = bytes([0x9A, 0x06, 0x02]) + b"on"  # field 99, length-delimited, "on"
    if not dsn:
        return queue_pb2.Envelope.FromString(envelope.SerializeToString() + newer_field)
    given = queue_pb2.RecipientDsn(address=envelope.recipients[0], notify="NEVER")
    envelope.recipient_dsn.append(
        queue_pb2.RecipientDsn.FromString(given.SerializeToString() + newer_field)
    )
    return envelope


@pytest.mark.parametrize("dsn", [False, True], ids=["in the envelope", "in a recipient's DSN"])
def test_an_envelope_with_fields_of_a_newer_version_is_left_for_an_up_to_date_queue(
    queue: ServiceRelay, nats_server: NatsServer, dsn: bool
) -> None:
    """Stored without the field, the message would not be what its client asked for."""
    whole = queue_pb2.EnqueueMessageRequest(
        envelope=_from_a_newer_client(envelope("APINEWER00000001"), dsn), body=BODY
    )
    streamed = [
        queue_pb2.EnqueueRequest(envelope=_from_a_newer_client(envelope("APINEWER00000002"), dsn)),
        queue_pb2.EnqueueRequest(chunk=BODY),
    ]
    [answer] = asyncio.run(_on_one_stream(queue.queue_address, [[whole]]))
    assert answer.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "numbers [99]" in answer.message
    assert asyncio.run(_streamed(queue.queue_address, streamed)) == grpc.StatusCode.UNAVAILABLE
    assert message_records(nats_server.url) == []


def test_both_shapes_store_a_well_formed_message(
    queue: ServiceRelay, nats_server: NatsServer
) -> None:
    whole = queue_pb2.EnqueueMessageRequest(envelope=envelope("APIWHOLE00000001"), body=BODY)
    streamed = [
        queue_pb2.EnqueueRequest(envelope=envelope("APISTREAM0000001")),
        queue_pb2.EnqueueRequest(chunk=BODY[:7]),
        queue_pb2.EnqueueRequest(chunk=BODY[7:]),
    ]
    [answer] = asyncio.run(_on_one_stream(queue.queue_address, [[whole]]))
    assert answer.code == grpc.StatusCode.OK.value[0]
    assert asyncio.run(_streamed(queue.queue_address, streamed)) == grpc.StatusCode.OK
    stored = {record.queue_id: record for record in message_records(nats_server.url)}
    assert sorted(stored) == ["APISTREAM0000001", "APIWHOLE00000001"]
    assert all(record.size == len(BODY) for record in stored.values())


def test_any_clients_addresses_are_stored_with_their_domains_normalised(
    queue: ServiceRelay, nats_server: NatsServer
) -> None:
    """What ingress does for its clients, Enqueue does for any other: one form (core/domains.py)."""
    request = queue_pb2.EnqueueMessageRequest(
        envelope=envelope(mail_from="A@Cla\u00df.TEST", recipients=["R@\uff45xample\u3002com"]),
        body=BODY,
    )
    [answer] = asyncio.run(_on_one_stream(queue.queue_address, [[request]]))
    assert answer.code == grpc.StatusCode.OK.value[0]
    [record] = message_records(nats_server.url)
    assert record.mail_from == "A@xn--cla-7ka.test"
    assert [r.address for r in record.recipients] == ["R@example.com"]


async def _on_one_stream(
    address: str, batches: list[list[queue_pb2.EnqueueMessageRequest]]
) -> list[queue_pb2.EnqueueResult]:
    """Send the batches on one EnqueueMessages call, then collect its answers to the end."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = queue_pb2_grpc.QueueServiceStub(channel).EnqueueMessages(
            timeout=30, wait_for_ready=True
        )
        for batch in batches:
            await call.write(queue_pb2.EnqueueBatch(messages=batch))
        await call.done_writing()
        results = [result async for response in call for result in response.results]
        assert await call.code() == grpc.StatusCode.OK
        return results


def test_the_message_stream_answers_each_message_and_refuses_only_the_malformed(
    queue: ServiceRelay, nats_server: NatsServer
) -> None:
    good = [
        queue_pb2.EnqueueMessageRequest(envelope=envelope(f"APIMANY0000000{n:02}"), body=BODY)
        for n in range(20)
    ]
    malformed: list[queue_pb2.EnqueueMessageRequest] = [p.values[0] for p in MALFORMED]  # type: ignore[misc]
    # Malformed ones alone and in the middle of a batch of good ones, and an empty batch.
    batches = [malformed[:1], [*good[:10], *malformed[1:], *good[10:15]], [], good[15:]]
    results = asyncio.run(_on_one_stream(queue.queue_address, batches))
    # One answer per request, whatever order they were stored in.
    assert len(results) == len(MALFORMED) + len(good)
    refused = [r for r in results if r.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    stored = [r for r in results if r.code == grpc.StatusCode.OK.value[0]]
    assert len(refused) == len(MALFORMED) and all(r.message for r in refused)
    assert sorted(r.queue_id for r in stored) == sorted(g.envelope.queue_id for g in good)
    records = message_records(nats_server.url)
    assert sorted(r.queue_id for r in records) == sorted(g.envelope.queue_id for g in good)


def test_a_stopping_queue_ends_the_message_stream_cleanly_after_answering(
    queue: ServiceRelay, nats_server: NatsServer
) -> None:
    async def run() -> tuple[list[queue_pb2.EnqueueResult], grpc.StatusCode]:
        async with grpc.aio.insecure_channel(queue.queue_address) as channel:
            call = queue_pb2_grpc.QueueServiceStub(channel).EnqueueMessages(
                timeout=30, wait_for_ready=True
            )
            request = queue_pb2.EnqueueMessageRequest(
                envelope=envelope("APISTOP000000001"), body=BODY
            )
            await call.write(queue_pb2.EnqueueBatch(messages=[request]))
            first = await call.read()
            assert first is not grpc.aio.EOF
            answered = list(first.results)
            # The call stays open, not half-closed: only the queue's stop can end it.
            queue.processes["queue"].send_signal(signal.SIGTERM)
            while (response := await call.read()) is not grpc.aio.EOF:
                answered.extend(response.results)
            return answered, await call.code()

    answered, code = asyncio.run(run())
    assert code == grpc.StatusCode.OK
    assert [(r.queue_id, r.code) for r in answered] == [("APISTOP000000001", 0)]
    assert [r.queue_id for r in message_records(nats_server.url)] == ["APISTOP000000001"]


def test_a_refusal_reaches_a_client_still_sending_the_body(
    queue: ServiceRelay, nats_server: NatsServer
) -> None:
    """A streamed message refused at its envelope while its body is on the way: the
    client must hear the refusal (UNAVAILABLE: another queue takes it), not gRPC's
    INTERNAL for a write the ended call no longer took (grpc/grpc#36066)."""
    chunk = b"x" * 65536
    for attempt in range(30):
        queue_id = f"APIBUSY{attempt:09d}"
        newer = _from_a_newer_client(envelope(queue_id, size=64 * len(chunk)))
        requests = [queue_pb2.EnqueueRequest(envelope=newer)]
        requests += [queue_pb2.EnqueueRequest(chunk=chunk)] * 64
        code = asyncio.run(_streamed(queue.queue_address, requests))
        assert code == grpc.StatusCode.UNAVAILABLE, f"attempt {attempt}"
    assert message_records(nats_server.url) == []
