"""Writes into one stream that pile up go out as atomic batches (core/atomic_batches.py),
against a real nats-server: each caller still gets its own PubAck or its own error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kurrier.core.atomic_batches import AtomicBatches
from kurrier.core.jetstream import MESSAGES_STREAM, connect, disconnect, ensure_layout
from kurrier.core.records import RecordChanged, RecordStore
from kurrier.core.settings import batch_size
from nats.aio.client import Client as NATS
from nats.js.api import Header, PubAck, StreamConfig
from nats.js.errors import APIError

from tests.support.nats import NatsServer
from tests.support.queued import queued_record

STREAM = "BATCHED"
WRONG_LAST_SEQUENCE = (10071, 10164)


async def _connected(url: str, allow_atomic: bool = True) -> AsyncIterator[NATS]:
    nc = await connect(url, "test-atomic-batches")
    try:
        await nc.jetstream().add_stream(
            StreamConfig(name=STREAM, subjects=["batched.>"], allow_atomic=allow_atomic)
        )
        yield nc
    finally:
        await disconnect(nc)


def _write(n: int, **extra: str) -> tuple[str, bytes, dict[str, str]]:
    return f"batched.{n}", f"payload {n}".encode(), {Header.MSG_ID.value: f"id-{n}", **extra}


async def _stored(nc: NATS, ack: PubAck) -> tuple[str, bytes]:
    message = await nc.jetstream().get_msg(STREAM, ack.seq)
    return message.subject or "", message.data or b""


def test_writes_that_pile_up_are_one_batch_and_each_gets_its_own_sequence(
    nats_server: NatsServer,
) -> None:
    async def scenario() -> None:
        async for nc in _connected(nats_server.url):
            batches = AtomicBatches(nc.jetstream(), STREAM, min_size=4, nc=nc)
            writes = [_write(n) for n in range(60)]
            acks = await asyncio.gather(*(batches.publish(*write) for write in writes))
            assert batches.batches == {"stored": 1}
            for (subject, payload, _), ack in zip(writes, acks, strict=True):
                assert not ack.duplicate
                assert await _stored(nc, ack) == (subject, payload)
            assert (await nc.jetstream().stream_info(STREAM)).state.messages == 60

    asyncio.run(scenario())


def test_fewer_writes_than_the_least_batch_are_plain_publishes(nats_server: NatsServer) -> None:
    async def scenario() -> None:
        async for nc in _connected(nats_server.url):
            batches = AtomicBatches(nc.jetstream(), STREAM, min_size=8, nc=nc)
            acks = await asyncio.gather(*(batches.publish(*_write(n)) for n in range(5)))
            assert batches.batches == {}
            assert sorted(ack.seq for ack in acks) == [1, 2, 3, 4, 5]

    asyncio.run(scenario())


def test_a_member_the_stream_refuses_fails_alone(nats_server: NatsServer) -> None:
    async def scenario() -> None:
        async for nc in _connected(nats_server.url):
            js = nc.jetstream()
            await js.publish("batched.taken", b"first")
            batches = AtomicBatches(js, STREAM, min_size=4, nc=nc)
            # Expects the subject to be new: it is not, so a batch holding it is refused whole.
            refused = _write(99, **{Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: "0"})
            refused = ("batched.taken", *refused[1:])
            writes = [_write(n) for n in range(10)]
            results = await asyncio.gather(
                *(batches.publish(*write) for write in [*writes[:5], refused, *writes[5:]]),
                return_exceptions=True,
            )
            assert batches.batches == {"refused": 1}
            error = results.pop(5)
            assert isinstance(error, APIError) and error.err_code in WRONG_LAST_SEQUENCE
            for (subject, payload, _), ack in zip(writes, results, strict=True):
                assert isinstance(ack, PubAck)
                assert await _stored(nc, ack) == (subject, payload)
            assert (await js.stream_info(STREAM)).state.messages == 11

    asyncio.run(scenario())


def test_a_member_stored_before_is_a_duplicate_not_a_second_copy(
    nats_server: NatsServer,
) -> None:
    async def scenario() -> None:
        async for nc in _connected(nats_server.url):
            js = nc.jetstream()
            # A write a lost batch stored, sent again: JetStream knows its id.
            subject, payload, headers = _write(3)
            first = await js.publish(subject, payload, headers=dict(headers))
            batches = AtomicBatches(js, STREAM, min_size=4, nc=nc)
            acks = await asyncio.gather(*(batches.publish(*_write(n)) for n in range(8)))
            assert batches.batches == {"refused": 1}
            assert acks[3].duplicate and acks[3].seq == first.seq
            assert [ack.duplicate for ack in acks].count(True) == 1
            assert (await js.stream_info(STREAM)).state.messages == 8

    asyncio.run(scenario())


def test_a_stream_without_atomic_batches_is_written_one_by_one(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async for nc in _connected(nats_server.url, allow_atomic=False):
            batches = AtomicBatches(nc.jetstream(), STREAM, min_size=2, nc=nc)
            first = await asyncio.gather(*(batches.publish(*_write(n)) for n in range(6)))
            assert not batches.batching
            later = await asyncio.gather(*(batches.publish(*_write(n)) for n in range(6, 12)))
            assert batches.batches == {"refused": 1}
            assert sorted(ack.seq for ack in [*first, *later]) == list(range(1, 13))

    asyncio.run(scenario())
    assert "does not take atomic batches" in caplog.text


def test_a_write_that_may_be_batched_needs_a_message_id(nats_server: NatsServer) -> None:
    async def scenario() -> None:
        async for nc in _connected(nats_server.url):
            batches = AtomicBatches(nc.jetstream(), STREAM, min_size=2, nc=nc)
            with pytest.raises(ValueError, match="Nats-Msg-Id"):
                await batches.publish("batched.x", b"", {})

    asyncio.run(scenario())


@pytest.mark.parametrize("text", ["1", "-2", "two", "", "auto"])
def test_a_batch_of_one_or_less_is_not_a_setting(text: str) -> None:
    with pytest.raises(Exception, match="batch size"):
        batch_size(text)


def test_records_are_created_and_removed_in_batches(nats_server: NatsServer) -> None:
    """The queue's creates and delivery's guarded removals, the writes of every message."""

    async def scenario() -> None:
        nc = await connect(nats_server.url, "test-atomic-batches")
        try:
            js = nc.jetstream()
            await ensure_layout(js, owner=True)
            writes = AtomicBatches(js, MESSAGES_STREAM, min_size=4, nc=nc)
            records = await RecordStore.open(js, writes)
            made = [queued_record(f"BATCHED{n:013d}") for n in range(30)]
            revisions = await asyncio.gather(*(records.create(r) for r in made))
            assert writes.batches == {"stored": 1}
            for record, revision in zip(made, revisions, strict=True):
                assert await records.get(record.queue_id, fresh=True) == (record, revision)
            # One removal at a revision the record is no longer at: that one alone fails.
            assert all(revisions)
            guards = [revision or 0 for revision in revisions]
            guards[7] -= 1
            outcomes = await asyncio.gather(
                *(records.delete(r.queue_id, guard) for r, guard in zip(made, guards, strict=True)),
                return_exceptions=True,
            )
            assert writes.batches == {"stored": 1, "refused": 1}
            assert isinstance(outcomes.pop(7), RecordChanged)
            assert outcomes == [None] * 29
            left = [r.queue_id async for r in records.all()]
            assert left == [made[7].queue_id]
        finally:
            await disconnect(nc)

    asyncio.run(scenario())


def test_a_write_whose_caller_gave_up_before_it_went_out_is_not_sent(
    nats_server: NatsServer,
) -> None:
    async def scenario() -> None:
        async for nc in _connected(nats_server.url):
            batches = AtomicBatches(nc.jetstream(), STREAM, min_size=4, nc=nc)
            writes = [asyncio.ensure_future(batches.publish(*_write(n))) for n in range(6)]
            # Let the writers start, not yet send: the last ones wait their turn.
            await asyncio.sleep(0)
            writes[5].cancel()
            acks = await asyncio.gather(*writes[:5])
            assert writes[5].cancelled()
            assert sorted(ack.seq for ack in acks) == [1, 2, 3, 4, 5]
            assert (await nc.jetstream().stream_info(STREAM)).state.messages == 5

    asyncio.run(scenario())


class _GatedBatches(AtomicBatches):
    """Batches whose commits, once answered, wait for the gate: so that two writers
    finish in the same turn of the event loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.both_at_the_gate = asyncio.Event()
        self._at_the_gate = 0

    async def _commit(self, writes: list[Any]) -> PubAck:
        ack = await super()._commit(writes)
        self._at_the_gate += 1
        if self._at_the_gate == 2:
            self.both_at_the_gate.set()
        await self.gate.wait()
        return ack


async def _writes_twice(batches: AtomicBatches, first: int) -> None:
    await batches.publish(*_write(first))
    await batches.publish(*_write(first + 100))


def test_a_write_made_as_two_writers_finish_together_still_finds_a_writer(
    nats_server: NatsServer,
) -> None:
    """Both writers end their batches in one turn; the callers of the first write
    again at once, before either writer has been counted out. Their writes must
    not be left pending with no writer to take them."""

    async def scenario() -> None:
        async for nc in _connected(nats_server.url):
            batches = _GatedBatches(nc.jetstream(), STREAM, min_size=2, nc=nc)
            again = [asyncio.ensure_future(_writes_twice(batches, n)) for n in (0, 1)]
            await asyncio.sleep(0)  # the first writer takes both into one batch
            once = [asyncio.ensure_future(batches.publish(*_write(n))) for n in (2, 3)]
            async with asyncio.timeout(10):
                await batches.both_at_the_gate.wait()  # a second writer took those
            batches.gate.set()
            async with asyncio.timeout(10):
                await asyncio.gather(*again, *once)
            assert batches.batches["stored"] >= 2
            assert (await nc.jetstream().stream_info(STREAM)).state.messages == 6

    asyncio.run(scenario())
