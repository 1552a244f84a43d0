"""`kurrier queue`: the queue service process."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kurrier.core.http_endpoint import HttpEndpoint
from kurrier.core.jetstream import LEASES_BUCKET, connect, disconnect, ensure_layout
from kurrier.core.lifecycle import run_until, stop_event
from kurrier.core.records import RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.core.telemetry import QUEUE_DEPTH, grpc_server_interceptors
from kurrier.queue.consumers import run_due, run_results
from kurrier.queue.leadership import Lease
from kurrier.queue.manager import QueueManager
from kurrier.queue.retry_schedule import RetrySchedule
from kurrier.queue.service import STREAM_METHOD, QueueService
from kurrier.queue.sweeper import Sweeper
from kurrier.v1 import queue_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueSettings:
    nats_url: str
    listen: str
    replicas: int
    schedule: RetrySchedule
    hostname: str
    body_store_limit: int | None = None
    metrics_listen: str | None = None
    grpc_tls: GrpcTls | None = None


@dataclass(frozen=True)
class GrpcTls:
    """TLS on the gRPC port; with client_ca_file, mutual TLS (a client certificate it signed)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
            root_certificates=Path(self.client_ca_file).read_bytes()
            if self.client_ca_file
            else None,
            require_client_auth=self.client_ca_file is not None,
        )


async def serve_queue(settings: QueueSettings) -> None:
    stop = stop_event()
    nc = await connect(settings.nats_url, "kurrier-queue")
    js = nc.jetstream()
    await ensure_layout(
        js, settings.replicas, owner=True, body_store_limit=settings.body_store_limit
    )
    tables = TableFollower()
    records = await RecordStore.open(js)
    manager = QueueManager(js, records, tables, settings.schedule, settings.hostname)
    sweeper_lease = Lease(await js.key_value(LEASES_BUCKET), "queue-sweeper")

    async def count_depth() -> None:
        QUEUE_DEPTH.update(await records.count_by_state())

    if settings.metrics_listen:
        endpoint = HttpEndpoint(lambda: nc.is_connected, refresh=count_depth)
        await endpoint.serve(settings.metrics_listen)
    server = grpc.aio.server(interceptors=grpc_server_interceptors([STREAM_METHOD]))
    service = QueueService(js, records, manager)
    queue_pb2_grpc.add_QueueServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.grpc_tls is not None:
        server.add_secure_port(settings.listen, settings.grpc_tls.credentials())
    else:
        server.add_insecure_port(settings.listen)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("queue listening on %s", settings.listen)
    try:
        await run_until(
            stop,
            tables.run(js),
            run_results(js, manager),
            run_due(js, manager),
            sweeper_lease.run(Sweeper(js, manager).run),
        )
    finally:
        await health_servicer.enter_graceful_shutdown()
        # Let Enqueue calls in flight finish: their clients are waiting for a 250.
        # Streams end once what they read is stored, so they need not use the grace.
        service.close_streams()
        await server.stop(grace=10)
        await disconnect(nc)
