"""What a power cut leaves of one node's unsynced jobs stream loses and repeats nothing.

On one node the jobs stream is stored without a sync per write
(unsynced_jobs, core/jetstream.py): after a power cut it comes back from disk
as it was some moments before, its consumer's state with it. This machine
cannot cut its own power, so the test does what such a cut leaves: it kills
nats-server, puts back the jobs stream's directory as it was earlier (taken
while nats-server was stopped, so the copy is whole), and starts nats-server
on that store. The records, synced per write, keep everything that happened
since. Then:
- a message that finished after that moment has its job back, never given
  as far as JetStream knows, and delivery must not send it again;
- a message accepted after that moment has lost its job, and the sweeper
  must dispatch it again from its record, and delivery send it once.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from kurrier.core.atomic_batches import AtomicBatches
from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    DISPATCH_STREAM,
    connect,
    disconnect,
    ensure_layout,
)
from kurrier.core.message import MessageRecord, RecipientState
from kurrier.core.records import RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.worker import STALE_JOB, DeliveryWorker
from kurrier.queue.dispatch import mark_dispatched, publish_jobs
from kurrier.queue.manager import QueueManager
from kurrier.queue.retry_schedule import RetrySchedule
from kurrier.queue.sweeper import DISPATCH_GRACE, Sweeper
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PersistMode

from tests.delivery.attempts import table
from tests.support.nats import NatsServer
from tests.support.relay import route
from tests.support.sink import Sink

FINISHED = "FINISHEDBEFORECUT001"  # its job stored before the moment, its message finished after
ACCEPTED = "ACCEPTEDAFTERMOMENT1"  # stored after the moment, not yet delivered at the cut


def _jobs_directory(server: NatsServer) -> Path:
    [found] = server.store_dir.glob(f"jetstream/*/streams/{DISPATCH_STREAM}")
    return found


async def _accept(js: JetStreamContext, queue_id: str) -> None:
    """As the queue accepts a message with a small body: its record, then its job."""
    body = f"Subject: {queue_id}\r\n\r\nbody\r\n".encode()
    record = MessageRecord(
        queue_id=queue_id,
        mail_from="a@client.test",
        recipients=[RecipientState(address="r@example.com")],
        received_at=time.time(),
        size=len(body),
        body_store="record",
        body=body,
    )
    mark_dispatched(record, ["r@example.com"], time.time())
    revision = await (await RecordStore.open(js)).create(record)
    assert revision
    jobs = AtomicBatches(js, DISPATCH_STREAM)
    await publish_jobs(jobs, TableFollower().table, record, ["r@example.com"], revision)


async def _deliver(nc: NATS, sink: Sink, sent: int, stale_after: float) -> None:
    """A delivery worker until the sink holds `sent` messages and no record is left."""
    js = nc.jetstream()
    tables = TableFollower()
    tables.table = table(route("r", ["example.com"], sink.port))
    worker = DeliveryWorker(
        js, tables, DeliverySettings(helo_name="relay.test"), stale_after=stale_after, nc=nc
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    records = await RecordStore.open(js)
    deadline = time.monotonic() + 30
    try:
        while len(sink.messages) < sent or [r async for r in records.all()]:
            assert not running.done(), "the worker ended"
            assert time.monotonic() < deadline, f"{len(sink.messages)} of {sent} sent"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=30)


async def _before_the_moment(url: str) -> None:
    nc = await connect(url, "test-before")
    try:
        js = nc.jetstream()
        await ensure_layout(js, 1, owner=True)
        assert (await js.stream_info(DISPATCH_STREAM)).config.persist_mode == PersistMode.ASYNC
        await _accept(js, FINISHED)
    finally:
        await disconnect(nc)


async def _after_the_moment(url: str, sink: Sink) -> None:
    nc = await connect(url, "test-after")
    try:
        js = nc.jetstream()
        await ensure_layout(js, 1, owner=True)  # the buckets kept in memory, as services do
        await _deliver(nc, sink, 1, stale_after=STALE_JOB)  # FINISHED, as it goes without a cut
        await _accept(js, ACCEPTED)
    finally:
        await disconnect(nc)


async def _after_the_cut(url: str, sink: Sink) -> tuple[int, list[str]]:
    nc = await connect(url, "test-after-cut")
    try:
        js = nc.jetstream()
        await ensure_layout(js, 1, owner=True)
        info = await js.stream_info(DISPATCH_STREAM, subjects_filter="kurrier.deliver.*")
        jobs = sorted(subject.rsplit(".", 1)[-1] for subject in info.state.subjects or {})
        records = await RecordStore.open(js)
        manager = QueueManager(js, records, TableFollower(), RetrySchedule(), "relay.test")
        redispatched, _ = await Sweeper(js, manager).sweep(now=time.time() + 2 * DISPATCH_GRACE)
        # FINISHED's job counts as late (it is seconds old here, minutes after a real cut).
        await _deliver(nc, sink, 2, stale_after=0.0)
        consumer = await js.consumer_info(DISPATCH_STREAM, DELIVERY_CONSUMER)
        assert not consumer.num_pending and not consumer.num_ack_pending
        return redispatched, jobs
    finally:
        await disconnect(nc)


def test_a_power_cuts_loss_of_unsynced_jobs_loses_and_repeats_nothing(
    nats_server: NatsServer, sink: Sink, tmp_path: Path
) -> None:
    asyncio.run(_before_the_moment(nats_server.url))
    nats_server.stop()  # stopped, not killed: it writes out what it buffers first
    jobs, earlier = _jobs_directory(nats_server), tmp_path / "jobs-as-they-were"
    shutil.copytree(jobs, earlier)
    nats_server.start()

    asyncio.run(_after_the_moment(nats_server.url, sink))
    nats_server.stop(kill=True)
    shutil.rmtree(jobs)
    shutil.copytree(earlier, jobs)
    nats_server.start()

    redispatched, jobs_after_the_cut = asyncio.run(_after_the_cut(nats_server.url, sink))
    assert jobs_after_the_cut == [FINISHED]  # back from before the moment; ACCEPTED's gone
    assert redispatched == 1
    assert sorted(m.content.split(b"\r\n")[0] for m in sink.messages) == [
        f"Subject: {queue_id}".encode() for queue_id in (ACCEPTED, FINISHED)
    ]
