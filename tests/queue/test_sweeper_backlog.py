"""The sweeper past `LISTABLE` stored messages: it does not list that stream, and waits.

Listing a stream's subjects costs the server (and the sweeper) in proportion
to the stream, so past `sweeper.LISTABLE` messages the sweeper skips the
listing: orphaned bodies wait for a later round, a dispatch whose job was
never published waits for its lease to run out (which needs no listing).
`LISTABLE` is made small here (monkeypatched) instead of storing 10 000
bodies; each case is taken at the boundary, one message either side.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from kurrier.core.body_store import store_body
from kurrier.core.jetstream import (
    BODIES_STREAM,
    DISPATCH_STREAM,
    connect,
    disconnect,
    dispatch_subject,
    ensure_layout,
)
from kurrier.core.message import DeliveryJob, MessageRecord, RecipientState
from kurrier.core.records import RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.queue import sweeper
from kurrier.queue.dispatch import mark_dispatched
from kurrier.queue.manager import QueueManager
from kurrier.queue.retry_schedule import RetrySchedule
from kurrier.queue.sweeper import DISPATCH_GRACE, Sweeper
from nats.js import JetStreamContext

from tests.support.nats import NatsServer

BODY = b"Subject: backlog\r\n\r\nbody\r\n"
LATER = 2 * DISPATCH_GRACE  # every body stored now is old enough to judge by then


@asynccontextmanager
async def _queue(nats_url: str) -> AsyncIterator[tuple[JetStreamContext, RecordStore, Sweeper]]:
    nc = await connect(nats_url, "test-sweeper-backlog")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        records = await RecordStore.open(js)
        manager = QueueManager(js, records, TableFollower(), RetrySchedule(), "relay.test")
        yield js, records, Sweeper(js, manager)
    finally:
        await disconnect(nc)


async def _store_orphans(js: JetStreamContext, prefix: str, count: int) -> None:
    for n in range(count):
        queue_id = f"{prefix}{n:014d}"
        await store_body(js, queue_id, io.BytesIO(BODY), len(BODY))


async def _stored_bodies(js: JetStreamContext) -> int:
    return (await js.stream_info(BODIES_STREAM)).state.messages


async def _orphaned_bodies(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bodies no record refers to: removed at LISTABLE, left alone at LISTABLE + 1."""
    async with _queue(nats_url) as (js, _, sweep):
        monkeypatch.setattr(sweeper, "LISTABLE", 3)
        await _store_orphans(js, "ATLIMIT", 3)
        _, at_limit = await sweep.sweep(now=time.time() + LATER)
        await _store_orphans(js, "PASTLIMIT", 4)
        _, past_limit = await sweep.sweep(now=time.time() + LATER)
        stored_meanwhile = await _stored_bodies(js)
        # A later round, the backlog back within reach, collects them.
        monkeypatch.setattr(sweeper, "LISTABLE", 4)
        _, later = await sweep.sweep(now=time.time() + LATER)
        return [at_limit, past_limit, stored_meanwhile, later, await _stored_bodies(js)]


def test_orphaned_bodies_wait_while_the_bodies_stream_is_too_long_to_list(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    at_limit, past_limit, stored_meanwhile, later, left = asyncio.run(
        _orphaned_bodies(nats_server.url, monkeypatch)
    )
    assert (at_limit, past_limit, stored_meanwhile) == (3, 0, 4)
    assert (later, left) == (4, 0)


async def _record(
    js: JetStreamContext, records: RecordStore, queue_id: str, lease_ends: float
) -> None:
    """A stored message dispatched two graces ago, whose job JetStream does not hold."""
    dispatched = time.time() - 2 * DISPATCH_GRACE
    record = MessageRecord(
        queue_id=queue_id,
        mail_from="a@client.test",
        recipients=[RecipientState(address="r@example.com")],
        received_at=dispatched,
        size=len(BODY),
        body_store=await store_body(js, queue_id, io.BytesIO(BODY), len(BODY)),
    )
    mark_dispatched(record, ["r@example.com"], dispatched)
    record.recipients[0].next_attempt = lease_ends
    assert await records.create(record)


async def _jobs(js: JetStreamContext) -> int:
    return (await js.stream_info(DISPATCH_STREAM)).state.messages


async def _dispatches(records: RecordStore, queue_id: str) -> int:
    found = await records.get(queue_id, fresh=True)
    assert found is not None
    return found[0].dispatches


async def _lost_dispatches(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    async with _queue(nats_url) as (js, records, sweep):
        monkeypatch.setattr(sweeper, "LISTABLE", 4)
        # Its job was never published, and its lease has 10 minutes to go.
        await _record(js, records, "UNPUBLISHED000000001", time.time() + 600)
        # Its lease ran out an hour ago: re-dispatched whatever JetStream holds.
        await _record(js, records, "LEASEDOUT00000000001", time.time() - 3600)
        # Other messages' jobs waiting for delivery: the jobs stream is past LISTABLE.
        for n in range(5):
            other = DeliveryJob(
                queue_id=f"WAITING{n:013d}",
                dispatch=1,
                mail_from="a@client.test",
                recipients=["r@example.com"],
                size=len(BODY),
                body_store="stream",
            )
            await js.publish(
                dispatch_subject(other.queue_id),
                other.model_dump_json().encode(),
                stream=DISPATCH_STREAM,
            )
        past_limit, _ = await sweep.sweep()
        skipped = await _dispatches(records, "UNPUBLISHED000000001")
        leased_out = await _dispatches(records, "LEASEDOUT00000000001")
        # The leased-out message's new job makes 6; at LISTABLE 6 the stream is listed.
        jobs = await _jobs(js)
        monkeypatch.setattr(sweeper, "LISTABLE", 6)
        at_limit, _ = await sweep.sweep()
        redone = await _dispatches(records, "UNPUBLISHED000000001")
        return [past_limit, skipped, leased_out, jobs, at_limit, redone]


def test_a_lost_dispatch_waits_for_its_lease_while_the_jobs_stream_is_too_long_to_list(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    past_limit, skipped, leased_out, jobs, at_limit, redone = asyncio.run(
        _lost_dispatches(nats_server.url, monkeypatch)
    )
    # Past the limit only the leased-out message is re-dispatched; the other waits.
    assert (past_limit, skipped, leased_out, jobs) == (1, 1, 2, 6)
    # At the limit the stream is listed, and the lost dispatch is found and redone.
    assert (at_limit, redone) == (1, 2)
