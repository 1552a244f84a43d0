"""`kurrier queue`: the queue service process."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kurrier.core.atomic_batches import AtomicBatches
from kurrier.core.grpc_tls import SERVER_OPTIONS, GrpcTls
from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    DISPATCH_STREAM,
    EARLIER_DISPATCH_STREAM,
    LEASES_BUCKET,
    MESSAGES_STREAM,
    OUTCOMES_CONSUMER,
    OUTCOMES_STREAM,
    HistoryLimits,
    unsynced_jobs,
)
from kurrier.core.metrics import QUEUE_DEPTH, QUEUE_OLDEST_AGE
from kurrier.core.records import RecordStore
from kurrier.core.service import Connected, Hooks, Service, serve
from kurrier.core.settings import BATCHED_RESULTS_BY_DEFAULT, BODIES_IN_RECORDS_BY_DEFAULT
from kurrier.core.telemetry import grpc_server_interceptors
from kurrier.queue.acked_cleanup import AckedCleanup
from kurrier.queue.callers import CallerCheck
from kurrier.queue.consumers import run_due, run_results
from kurrier.queue.job_backlog import JobBacklog
from kurrier.queue.leadership import Lease
from kurrier.queue.manager import QueueManager
from kurrier.queue.retry_schedule import RetrySchedule
from kurrier.queue.service import STREAM_METHOD, QueueService
from kurrier.queue.sweeper import Sweeper
from kurrier.v1 import queue_pb2_grpc

log = logging.getLogger(__name__)

# What a stopping queue gives the Enqueue calls in flight, and then the first jobs
# of the last messages it took in while NATS is away: together well inside the
# pod's termination grace (30 s, charts/kurrier/values.yaml), with room to close.
ENQUEUE_GRACE = 10.0
FIRST_JOBS_AT_STOP = 10.0


@dataclass(frozen=True)
class QueueSettings:
    nats_url: str
    listen: str
    replicas: int
    schedule: RetrySchedule
    hostname: str
    body_store_limit: int | None = None
    history: HistoryLimits | None = None
    metrics_listen: str | None = None
    grpc_tls: GrpcTls | None = None
    atomic_batch_min: int = 0
    # Results of the jobs it dispatches into the outcomes stream (DeliveryJob.batched_results).
    batched_results: bool = BATCHED_RESULTS_BY_DEFAULT
    # Bodies of up to 256 KiB kept inside their records (core/body_store.py).
    bodies_in_records: bool = BODIES_IN_RECORDS_BY_DEFAULT


async def serve_queue(settings: QueueSettings) -> None:
    await serve(
        Service(
            "queue",
            settings.nats_url,
            settings.replicas,
            settings.metrics_listen,
            functools.partial(_start, settings),
            owns_layout=True,
            body_store_limit=settings.body_store_limit,
            history=settings.history,
        )
    )


async def _start(settings: QueueSettings, nats: Connected) -> Hooks:
    js = nats.js
    least = settings.atomic_batch_min
    # nats-server takes no atomic batches into an unsynced stream (unsynced_jobs).
    jobs_least = 0 if unsynced_jobs(settings.replicas) else least
    records = await RecordStore.open(js, AtomicBatches(js, MESSAGES_STREAM, least, nats.nc))
    backlog = JobBacklog(js)
    # A body kept in its record is outside the bodies stream's cap: with a cap,
    # every body over CARRIED_BODY_LIMIT goes where the cap holds it.
    keeps_bodies = settings.bodies_in_records and settings.body_store_limit is None
    bodies_in_records = backlog.small if keeps_bodies else _never
    manager = QueueManager(
        js,
        records,
        nats.tables,
        settings.schedule,
        settings.hostname,
        AtomicBatches(js, DISPATCH_STREAM, jobs_least, nats.nc),
        settings.batched_results,
        bodies_in_records,
    )
    sweeper_lease = Lease(await js.key_value(LEASES_BUCKET), "queue-sweeper")
    grpc_server = _GrpcServer(settings, QueueService(js, records, manager))

    return Hooks(
        refresh_metrics=lambda: measure_queue(records),
        open=grpc_server.open,
        tasks=[
            lambda: run_results(js, manager),
            lambda: run_due(js, manager),
            AckedCleanup(js, DISPATCH_STREAM, DELIVERY_CONSUMER).run,
            AckedCleanup(js, EARLIER_DISPATCH_STREAM, DELIVERY_CONSUMER).run,
            AckedCleanup(js, OUTCOMES_STREAM, OUTCOMES_CONSUMER).run,
            backlog.run,
            lambda: sweeper_lease.run(Sweeper(js, manager).run),
        ],
        # The first jobs of the last messages taken in go out before NATS is left,
        # unless NATS is away: then within what the pod's grace leaves.
        drain=[grpc_server.drain, lambda: manager.store.first_jobs_sent(FIRST_JOBS_AT_STOP)],
        healthy=grpc_server.serving,
    )


def _never() -> bool:
    return False


async def measure_queue(records: RecordStore) -> None:
    """The queue's depth and its oldest message's age, by state: one pass over the records."""
    counts: Counter[str] = Counter()
    oldest: dict[str, float] = {}
    async for record in records.all():
        counts[record.state] += 1
        oldest[record.state] = min(oldest.get(record.state, math.inf), record.received_at)
    now = time.time()
    QUEUE_DEPTH.update(counts)
    QUEUE_OLDEST_AGE.update({state: max(0.0, now - at) for state, at in oldest.items()})


class _GrpcServer:
    """The queue's gRPC port: QueueService and the gRPC health service."""

    def __init__(self, settings: QueueSettings, service: QueueService) -> None:
        self._settings = settings
        self._service = service
        tls = settings.grpc_tls
        callers = [CallerCheck()] if tls is not None and tls.knows_clients else []
        self._server = grpc.aio.server(
            interceptors=[*callers, *grpc_server_interceptors([STREAM_METHOD])],
            options=SERVER_OPTIONS,
        )
        self._health = health.aio.HealthServicer()
        self._serving = False

    def serving(self) -> bool:
        """What gRPC health says, for /healthz: a probe speaks plain HTTP, whatever TLS the
        gRPC port wants (the kubelet's gRPC probe cannot present a client certificate)."""
        return self._serving

    async def open(self) -> None:
        queue_pb2_grpc.add_QueueServiceServicer_to_server(self._service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if self._settings.grpc_tls is not None:
            self._server.add_secure_port(
                self._settings.listen, self._settings.grpc_tls.credentials()
            )
        else:
            self._server.add_insecure_port(self._settings.listen)
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._serving = True
        log.info("queue listening on %s", self._settings.listen)

    async def drain(self) -> None:
        self._serving = False
        await self._health.enter_graceful_shutdown()
        # Let Enqueue calls in flight finish: their clients are waiting for a 250.
        # Streams end once what they read is stored, so they need not use the grace.
        self._service.close_streams()
        await self._server.stop(grace=ENQUEUE_GRACE)
