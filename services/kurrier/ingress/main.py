"""`kurrier ingress`: the SMTP front door."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

from kurrier.core.addresses import parse_host_port
from kurrier.core.http_endpoint import HttpEndpoint
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.core.lifecycle import stop_event
from kurrier.core.table_store import TableFollower
from kurrier.core.telemetry import SMTP_SESSIONS
from kurrier.ingress.connection_gate import SHUTTING_DOWN
from kurrier.ingress.handler import RelayHandler
from kurrier.ingress.identities import Identities
from kurrier.ingress.queue_client import QueueClient, QueueTls
from kurrier.ingress.session_limits import SessionLimits
from kurrier.ingress.smtp_session import IngressSMTP, Listener, Sessions
from kurrier.ingress.tls_certificate import ServerCertificate
from kurrier.ingress.token_review import KubeApiSettings, TokenReviewer

log = logging.getLogger(__name__)

# How long open sessions may take to finish their transactions after SIGTERM.
DRAIN_TIMEOUT = 30.0


@dataclass(frozen=True)
class IngressSettings:
    """From `kurrier ingress`'s flags (kurrier.core.settings.INGRESS: the defaults are there)."""

    nats_url: str
    queue_address: str
    hostname: str
    smtp: str | None
    submission: str | None
    smtps: str | None
    tls_cert: str | None
    tls_key: str | None
    replicas: int
    metrics_listen: str | None
    limits: SessionLimits
    kube_api: KubeApiSettings | None
    token_cache_ttl: float
    queue_tls: QueueTls | None


class _NoLoginDataWarning(logging.Filter):
    """aiosmtpd warns that its own Session.login_data is deprecated on every AUTH."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


async def serve_ingress(settings: IngressSettings) -> None:
    stop = stop_event()
    logging.getLogger("mail.log").addFilter(_NoLoginDataWarning())
    nc = await connect(settings.nats_url, "kurrier-ingress")
    js = nc.jetstream()
    await ensure_layout(js, settings.replicas)
    tables = TableFollower()
    following = asyncio.create_task(tables.run(js))
    queue = QueueClient(settings.queue_address, settings.queue_tls)
    reviewer = (
        TokenReviewer(settings.kube_api, settings.token_cache_ttl) if settings.kube_api else None
    )
    handler = RelayHandler(
        tables,
        queue,
        settings.hostname,
        Identities(reviewer),
        settings.limits.auth_failures_per_minute,
    )
    certificate = (
        ServerCertificate(settings.tls_cert, settings.tls_key)
        if settings.tls_cert and settings.tls_key
        else None
    )
    reloading = asyncio.create_task(certificate.follow()) if certificate else None
    tls = certificate.context if certificate else None
    sessions = Sessions(settings.limits, tables)
    SMTP_SESSIONS.follow(lambda: sessions.gate.open_connections)
    if settings.metrics_listen:
        await HttpEndpoint(lambda: nc.is_connected).serve(settings.metrics_listen)

    def session_factory(listener: Listener) -> IngressSMTP:
        return IngressSMTP(
            handler,
            listener=listener,
            sessions=sessions,
            hostname=settings.hostname,
            tls_context=tls,
        )

    loop = asyncio.get_running_loop()
    servers = []
    # Listen only once the first routing table is in: before it every domain
    # would look foreign. A closed port until then keeps readiness probes and
    # `kurrier up`'s ready line honest.
    if not tables.loaded.is_set():
        log.info("waiting for the first routing table before listening")
        await asyncio.wait(
            [asyncio.create_task(tables.loaded.wait()), asyncio.create_task(stop.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
    for address, listener in (
        (settings.smtp, Listener("smtp")),
        (settings.submission, Listener("submission", offers_auth=True)),
        (settings.smtps, Listener("smtps", implicit_tls=True, offers_auth=True)),
    ):
        if not address or stop.is_set():
            continue
        if listener.implicit_tls and tls is None:
            raise ValueError("--smtps needs --tls-cert and --tls-key")
        host, port = parse_host_port(address)
        servers.append(
            await loop.create_server(
                functools.partial(session_factory, listener),
                host,
                port,
                ssl=tls if listener.implicit_tls else None,
                reuse_address=True,
                start_serving=False,
            )
        )
        log.info("SMTP (%s) listening on %s", listener.name, address)
    # All ports bound before any accepts: one answering means all do (probes and
    # clients may check only one), and a port that cannot be bound stops
    # ingress before it took any mail.
    for server in servers:
        await server.start_serving()
    try:
        await stop.wait()
    finally:
        # Listeners stay open: a new client hears 421 and tries elsewhere, rather
        # than a refused connection.
        log.info("draining: new connections get 421, open transactions finish")
        sessions.drain()
        await _drain(sessions)
        for server in servers:
            server.close()
        for task in (following, reloading):
            if task is not None:
                task.cancel()
        await queue.close()
        if reviewer is not None:
            await reviewer.close()
        await disconnect(nc)


async def _drain(sessions: Sessions) -> None:
    try:
        await asyncio.wait_for(sessions.gate.emptied.wait(), DRAIN_TIMEOUT)
    except TimeoutError:
        log.warning("drain timed out; closing %d sessions", sessions.gate.open_connections)
    for session in list(sessions.live):
        session.say_goodbye(SHUTTING_DOWN)
