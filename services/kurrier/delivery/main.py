"""`kurrier delivery`: the delivery worker process."""

from __future__ import annotations

import functools
import logging

from kurrier.core.service import Connected, FirstTable, Hooks, Service, serve
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.worker import DeliveryWorker

log = logging.getLogger(__name__)


async def serve_delivery(
    nats_url: str, replicas: int, settings: DeliverySettings, metrics_listen: str | None
) -> None:
    await serve(
        Service(
            "delivery",
            nats_url,
            replicas,
            metrics_listen,
            functools.partial(_start, settings),
            # Jobs wait until the first routing table is in: without it every one would defer.
            first_table=FirstTable(before="delivering", timeout=30),
        )
    )


async def _start(settings: DeliverySettings, nats: Connected) -> Hooks:
    worker = DeliveryWorker(nats.js, nats.tables, settings, nc=nats.nc)

    async def deliver() -> None:
        log.info("delivery started with %d slots", settings.concurrency)
        # Returns after stop, once in-flight transactions are done.
        await worker.run(nats.stop)

    courier = worker.courier
    return Hooks(
        main=deliver,
        helpers=[courier.pool.run_reaper, courier.sts.keep_fresh],
        documents={"/tlsrpt": courier.tls_reports.report_document},
    )
