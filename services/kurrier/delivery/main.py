"""`kurrier delivery`: the delivery worker process."""

from __future__ import annotations

import asyncio
import logging

from kurrier.core.http_endpoint import HttpEndpoint
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.core.lifecycle import stop_event
from kurrier.core.table_store import TableFollower
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.worker import DeliveryWorker

log = logging.getLogger(__name__)


async def serve_delivery(
    nats_url: str, replicas: int, settings: DeliverySettings, metrics_listen: str | None
) -> None:
    stop = stop_event()
    nc = await connect(nats_url, "kurrier-delivery")
    js = nc.jetstream()
    await ensure_layout(js, replicas)
    tables = TableFollower()
    worker = DeliveryWorker(js, tables, settings)
    if metrics_listen:
        await HttpEndpoint(lambda: nc.is_connected).serve(metrics_listen)
    following = asyncio.create_task(tables.run(js))
    reaper = asyncio.create_task(worker.courier.pool.run_reaper())
    try:
        # Jobs wait until the first routing table is in: without it every one would defer.
        await asyncio.wait_for(tables.loaded.wait(), timeout=30)
    except TimeoutError:
        log.warning("no routing table published yet; delivering with an empty one")
    log.info("delivery started with %d slots", settings.concurrency)
    try:
        # Returns after stop, once in-flight transactions are done.
        await worker.run(stop)
    finally:
        following.cancel()
        reaper.cancel()
        await disconnect(nc)
