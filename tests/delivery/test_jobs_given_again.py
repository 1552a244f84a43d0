"""A job JetStream gives again, or first gives late, is not sent once its message finished.

The first taker of a job may have sent the message and lost the
acknowledgement (an ack is not confirmed; one sent while a stream elects its
leader is lost): JetStream then gives the job again after its ack wait. With
the body inside the job, nothing else would stop a second copy. The worker
asks for the message's record first, only for a job given again; no record
means the message finished, and the job is acknowledged without sending.
Here the first taker is the test, which takes both jobs and never
acknowledges them.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    DISPATCH_STREAM,
    OUTCOMES_STREAM,
    connect,
    disconnect,
    dispatch_subject,
    ensure_layout,
    outcome_subject,
)
from kurrier.core.table_store import TableFollower
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.worker import STALE_JOB, DeliveryWorker
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig

from tests.delivery.attempts import table
from tests.support.nats import NatsServer
from tests.support.queued import jobs_left, publish_job, store_record
from tests.support.relay import route
from tests.support.sink import Sink

ACK_WAIT = 2.0
CONCURRENCY = 4


def _worker(nc: NATS, sink: Sink, stale_after: float = STALE_JOB) -> DeliveryWorker:
    """A worker whose one route leads to the sink."""
    tables = TableFollower()
    tables.table = table(route("r", ["example.com"], sink.port))
    settings = DeliverySettings(helo_name="relay.test", concurrency=CONCURRENCY)
    return DeliveryWorker(
        nc.jetstream(), tables, settings, ack_wait=ACK_WAIT, stale_after=stale_after, nc=nc
    )


async def test_a_job_given_again_is_sent_only_while_its_message_is_queued(
    nats_server: NatsServer, sink: Sink
) -> None:
    nc = await connect(nats_server.url, "test-given-again")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        # LIVE is still queued; FINISHED's record is gone: it was delivered.
        await store_record(js, "LIVE000000000001")
        first_taker = await js.pull_subscribe(
            dispatch_subject("*"),
            durable=DELIVERY_CONSUMER,
            stream=DISPATCH_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT,
                max_deliver=-1,
                max_ack_pending=max(1000, CONCURRENCY * 4),
            ),
        )
        for queue_id in ("FINISHED00000001", "LIVE000000000001"):
            await publish_job(js, queue_id)
        taken = await first_taker.fetch(2, timeout=10)
        assert len(taken) == 2  # and never acknowledged

        worker = _worker(nc, sink)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        results = await js.pull_subscribe(outcome_subject("*"), stream=OUTCOMES_STREAM)
        # LIVE's record has no revision in its job, so the worker reports it.
        [reported] = await results.fetch(1, timeout=30)
        deadline = time.monotonic() + 30
        while await jobs_left(js):
            assert time.monotonic() < deadline, "the jobs were not acknowledged"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(running, timeout=30)
        assert reported.subject.endswith("LIVE000000000001")
        assert [m.content.split(b"\r\n")[0] for m in sink.messages] == [
            b"Subject: LIVE000000000001"
        ]
    finally:
        await disconnect(nc)


FINISHED, LIVE = "FINISHED00000002", "LIVE000000000002"


@pytest.mark.parametrize(("stale_after", "sent"), [(0.0, [LIVE]), (3600.0, [FINISHED, LIVE])])
async def test_a_job_first_given_late_is_sent_only_while_its_message_is_queued(
    nats_server: NatsServer, sink: Sink, stale_after: float, sent: list[str]
) -> None:
    """On one node a power cut can bring back a job whose message finished as one
    never given (STALE_JOB, delivery/worker.py). With stale_after 0 every job
    counts as late; with an hour none does, and a job's record is not read."""
    nc = await connect(nats_server.url, "test-late-job")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        await store_record(js, LIVE)
        for queue_id in (FINISHED, LIVE):
            await publish_job(js, queue_id)
        worker = _worker(nc, sink, stale_after)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        deadline = time.monotonic() + 30
        while await jobs_left(js) or len(sink.messages) < len(sent):
            assert time.monotonic() < deadline, "the jobs were not handled"
            assert not running.done(), "the worker ended"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(running, timeout=30)
        assert sorted(m.content.split(b"\r\n")[0] for m in sink.messages) == [
            f"Subject: {queue_id}".encode() for queue_id in sent
        ]
    finally:
        await disconnect(nc)
