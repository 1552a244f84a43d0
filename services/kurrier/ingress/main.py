"""`kurrier ingress`: the SMTP front door."""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from dataclasses import dataclass

from aiosmtpd.smtp import SMTP
from kurrier.core.addresses import parse_host_port
from kurrier.core.http_endpoint import HttpEndpoint
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.core.lifecycle import stop_event
from kurrier.core.table_store import TableFollower
from kurrier.ingress.handler import RelayHandler
from kurrier.ingress.queue_client import QueueClient

log = logging.getLogger(__name__)

# How long open sessions may take to finish their transactions after SIGTERM.
DRAIN_TIMEOUT = 30.0


@dataclass(frozen=True)
class IngressSettings:
    nats_url: str
    queue_address: str
    hostname: str
    smtp: str | None
    submission: str | None = None
    smtps: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    replicas: int = 1
    metrics_listen: str | None = None


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


async def serve_ingress(settings: IngressSettings) -> None:
    stop = stop_event()
    nc = await connect(settings.nats_url, "kurrier-ingress")
    js = nc.jetstream()
    await ensure_layout(js, settings.replicas)
    tables = TableFollower()
    following = asyncio.create_task(tables.run(js))
    queue = QueueClient(settings.queue_address)
    handler = RelayHandler(tables, queue, settings.hostname)
    tls = (
        server_tls_context(settings.tls_cert, settings.tls_key)
        if settings.tls_cert and settings.tls_key
        else None
    )
    sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
    if settings.metrics_listen:
        await HttpEndpoint(lambda: nc.is_connected).serve(settings.metrics_listen)

    def session_factory() -> SMTP:
        session = SMTP(
            handler,
            hostname=settings.hostname,
            ident="kurrier",
            decode_data=False,
            enable_SMTPUTF8=True,
            # Read per connection, so a new RelayPolicy limit applies at once.
            data_size_limit=tables.table.policy.max_message_size,
            tls_context=tls,
        )
        sessions.add(session)
        return session

    loop = asyncio.get_running_loop()
    listeners = []
    for address, implicit_tls in (
        (settings.smtp, False),
        (settings.submission, False),
        (settings.smtps, True),
    ):
        if not address:
            continue
        if implicit_tls and tls is None:
            raise ValueError("--smtps needs --tls-cert and --tls-key")
        host, port = parse_host_port(address)
        listeners.append(
            await loop.create_server(
                session_factory, host, port, ssl=tls if implicit_tls else None, reuse_address=True
            )
        )
        log.info("SMTP listening on %s%s", address, " (implicit TLS)" if implicit_tls else "")
    try:
        await stop.wait()
    finally:
        log.info("draining: no new connections, finishing open sessions")
        for listener in listeners:
            listener.close()
        await _drain(sessions)
        following.cancel()
        await queue.close()
        await disconnect(nc)


async def _drain(sessions: weakref.WeakSet[SMTP]) -> None:
    deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT
    while any(s.transport is not None and not s.transport.is_closing() for s in sessions):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
