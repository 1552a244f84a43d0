"""New bodies stay out of their records while delivery jobs pile up.

Against a real nats-server: the consumer's counts of jobs waiting and held are
JetStream's.
"""

from __future__ import annotations

import io

import pytest
from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    DISPATCH_STREAM,
    connect,
    disconnect,
    dispatch_subject,
    ensure_layout,
)
from kurrier.core.message import CARRIED_BODY_LIMIT
from kurrier.core.records import RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.queue import job_backlog
from kurrier.queue.job_backlog import JobBacklog
from kurrier.queue.manager import QueueManager
from kurrier.queue.retry_schedule import RetrySchedule
from nats.js.api import AckPolicy, ConsumerConfig

from tests.support.nats import NatsServer
from tests.support.queued import publish_job, template

BODY = b"x" * (CARRIED_BODY_LIMIT + 1)


async def test_bodies_leave_records_once_as_many_jobs_wait_as_the_limit(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_backlog, "WAITING_LIMIT", 4)
    nc = await connect(nats_server.url, "test-job-backlog")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        backlog = JobBacklog(js)
        records = await RecordStore.open(js)
        manager = QueueManager(
            js,
            records,
            TableFollower(),
            RetrySchedule(),
            "relay.test",
            bodies_in_records=backlog.small,
        )

        async def accepted_where(queue_id: str) -> str:
            await backlog.measure()
            record = await manager.intake.accept(template(queue_id), io.BytesIO(BODY), len(BODY))
            assert record is not None
            return record.body_store

        # No delivery worker has asked for a job yet: nothing is known to wait.
        for n in range(3):
            await publish_job(js, f"WAITING00000000000{n}")
        assert await accepted_where("BEFOREDELIVERY000001") == "record"

        taken = await js.pull_subscribe(
            dispatch_subject("*"),
            durable=DELIVERY_CONSUMER,
            stream=DISPATCH_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=60),
        )
        await manager.store.first_jobs_sent()
        # Four jobs wait: three published, one of the message accepted above.
        assert await accepted_where("FOURWAITING000000001") == "stream"
        assert backlog.waiting == 4
        held = await taken.fetch(2, timeout=10)
        for job in held[:1]:
            await job.ack_sync()
        await manager.store.first_jobs_sent()
        # Of the five stored, one acknowledged, one held and three not yet taken.
        assert await accepted_where("STILLWAITING00000001") == "stream"
        assert backlog.waiting == 4
        await manager.store.first_jobs_sent()
        for job in await taken.fetch(4, timeout=10):
            await job.ack_sync()
        await held[1].ack_sync()
        assert await accepted_where("NONEWAITING000000001") == "record"
        assert backlog.waiting == 0
    finally:
        await disconnect(nc)
