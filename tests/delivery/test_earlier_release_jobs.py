"""A job an earlier release's queue stored is delivered by this release's worker.

Delivery rolls first in an upgrade (docs/deploy.md): while queue processes
of an earlier release still run, their jobs land where that release puts
them (`kurrier.dispatch.<id>` in KURRIER_DISPATCH, or, the release before,
`kurrier.job.<id>` in KURRIER_JOBS), not in the jobs stream this release's
queue uses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    EARLIER_JOBS,
    connect,
    disconnect,
    ensure_layout,
    pull_batch,
)
from kurrier.core.table_store import TableFollower
from kurrier.delivery import worker as worker_module
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.worker import DeliveryWorker
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.delivery.attempts import table
from tests.support.nats import NatsServer
from tests.support.queued import publish_job
from tests.support.relay import route
from tests.support.sink import Sink


async def _acknowledged(js: JetStreamContext, stream: str) -> bool:
    try:
        consumer = await js.consumer_info(stream, DELIVERY_CONSUMER)
    except NotFoundError:
        return False
    floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
    return floor >= 1 and not consumer.num_pending and not consumer.num_ack_pending


@pytest.mark.parametrize("earlier", EARLIER_JOBS, ids=[stream for stream, _ in EARLIER_JOBS])
async def test_a_job_in_an_earlier_releases_stream_is_delivered_and_acknowledged(
    nats_server: NatsServer, sink: Sink, earlier: tuple[str, Callable[[str], str]]
) -> None:
    nc = await connect(nats_server.url, "test-earlier-jobs")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        queue_id = "EARLIER0000000000001"
        await publish_job(js, queue_id, earlier=earlier)

        tables = TableFollower()
        tables.table = table(route("r", ["example.com"], sink.port))
        worker = DeliveryWorker(js, tables, DeliverySettings(helo_name="relay.test"), nc=nc)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + 30
            while not sink.messages or not await _acknowledged(js, earlier[0]):
                assert not running.done(), "the worker ended"
                assert time.monotonic() < deadline, "the job was not delivered and acknowledged"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(running, timeout=30)
        [delivered] = sink.messages
        assert f"Subject: {queue_id}".encode() in delivered.content
    finally:
        await disconnect(nc)


async def test_a_failing_pull_loop_ends_the_worker_with_the_other_one(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker pulls from several consumers at once; when one loop fails, the
    others must not go on taking jobs for a worker that stopped handling them."""
    pull = pull_batch

    async def failing_for_earlier_jobs(subscription: Any, batch: int, timeout: float) -> Any:
        if batch == 1:  # earlier releases' consumers are pulled one job at a time
            raise RuntimeError("the earlier jobs' consumer broke")
        return await pull(subscription, batch, timeout)

    monkeypatch.setattr(worker_module, "pull_batch", failing_for_earlier_jobs)
    nc = await connect(nats_server.url, "test-failing-pull")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        worker = DeliveryWorker(
            js, TableFollower(), DeliverySettings(helo_name="relay.test", concurrency=4), nc=nc
        )
        with pytest.raises(RuntimeError, match="earlier jobs' consumer broke"):
            await asyncio.wait_for(worker.run(asyncio.Event()), timeout=30)
        still_taking = [
            task
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "").endswith(("._take", "JobFeed.run"))
        ]
        assert still_taking == []
    finally:
        await disconnect(nc)
