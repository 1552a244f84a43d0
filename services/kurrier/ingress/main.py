"""`kurrier ingress`: the SMTP front door."""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from dataclasses import dataclass

from kurrier.core.addresses import parse_host_port
from kurrier.core.cluster_counters import TIMEOUT, ClusterLeases
from kurrier.core.grpc_tls import QueueTls
from kurrier.core.metrics import SMTP_SESSIONS, TLS_CERTIFICATE_EXPIRY
from kurrier.core.service import Connected, FirstTable, Hooks, Service, serve
from kurrier.ingress.auth_failures import AuthFailures
from kurrier.ingress.connection_gate import SHUTTING_DOWN
from kurrier.ingress.handler import RelayHandler
from kurrier.ingress.identities import Identities
from kurrier.ingress.message_rates import MessageRates
from kurrier.ingress.queue_client import QueueClient
from kurrier.ingress.session_limits import SessionLimits
from kurrier.ingress.smtp_session import IngressSMTP, Listener, Sessions
from kurrier.ingress.tenant_quotas import TenantQuotas
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
    logging.getLogger("mail.log").addFilter(_NoLoginDataWarning())
    await serve(
        Service(
            "ingress",
            settings.nats_url,
            settings.replicas,
            settings.metrics_listen,
            functools.partial(_start, settings),
            # Listen only once the first routing table is in: before it every domain
            # would look foreign. A closed port until then keeps readiness probes and
            # `kurrier up`'s ready line honest.
            first_table=FirstTable(before="listening"),
        )
    )


async def _start(settings: IngressSettings, nats: Connected) -> Hooks:
    queue = QueueClient(settings.queue_address, settings.queue_tls)
    reviewer = (
        TokenReviewer(settings.kube_api, settings.token_cache_ttl) if settings.kube_api else None
    )
    handler = RelayHandler(
        nats.tables,
        queue,
        settings.hostname,
        Identities(reviewer),
        await MessageRates.open(nats.nc, settings.replicas),
        await TenantQuotas.open(nats.nc, settings.replicas),
        await AuthFailures.open(
            nats.nc, settings.replicas, settings.limits.auth_failures_per_minute
        ),
    )
    certificate = (
        ServerCertificate(settings.tls_cert, settings.tls_key)
        if settings.tls_cert and settings.tls_key
        else None
    )
    clients = await ClusterLeases.open(
        nats.nc.jetstream(timeout=TIMEOUT), "client-connections", settings.replicas
    )
    sessions = Sessions(settings.limits, nats.tables, clients)
    SMTP_SESSIONS.follow(lambda: sessions.gate.open_connections)
    if certificate is not None:
        TLS_CERTIFICATE_EXPIRY.follow(lambda: certificate.expires_at)
    tls = certificate.context if certificate else None
    listeners = _Listeners(settings, handler, sessions, tls)
    return Hooks(
        open=listeners.open,
        drain=[listeners.drain],
        helpers=[
            clients.refresh,
            *([certificate.follow] if certificate else []),
            *([queue.follow_certificate] if queue.certificate else []),
        ],
        close=[clients.flush, queue.close, *([reviewer.close] if reviewer else [])],
    )


class _Listeners:
    """The SMTP ports: all open together; on drain they turn newcomers away, then close."""

    def __init__(
        self,
        settings: IngressSettings,
        handler: RelayHandler,
        sessions: Sessions,
        tls: ssl.SSLContext | None,
    ) -> None:
        self._settings = settings
        self._handler = handler
        self._sessions = sessions
        self._tls = tls
        self._servers: list[asyncio.Server] = []

    def _session(self, listener: Listener) -> IngressSMTP:
        return IngressSMTP(
            self._handler,
            listener=listener,
            sessions=self._sessions,
            hostname=self._settings.hostname,
            tls_context=self._tls,
        )

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for address, listener in (
            (self._settings.smtp, Listener("smtp")),
            (self._settings.submission, Listener("submission", offers_auth=True)),
            (self._settings.smtps, Listener("smtps", implicit_tls=True, offers_auth=True)),
        ):
            if not address:
                continue
            if listener.implicit_tls and self._tls is None:
                raise ValueError("--smtps needs --tls-cert and --tls-key")
            host, port = parse_host_port(address)
            self._servers.append(
                await loop.create_server(
                    functools.partial(self._session, listener),
                    host,
                    port,
                    ssl=self._tls if listener.implicit_tls else None,
                    reuse_address=True,
                    start_serving=False,
                )
            )
            log.info("SMTP (%s) listening on %s", listener.name, address)
        # All ports bound before any accepts: one answering means all do (probes and
        # clients may check only one), and a port that cannot be bound stops
        # ingress before it took any mail.
        for server in self._servers:
            await server.start_serving()

    async def drain(self) -> None:
        # Listeners stay open: a new client hears 421 and tries elsewhere, rather
        # than a refused connection.
        log.info("draining: new connections get 421, open transactions finish")
        self._sessions.drain()
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await self._sessions.gate.emptied.wait()
        except TimeoutError:
            log.warning(
                "drain timed out; closing %d sessions", self._sessions.gate.open_connections
            )
        for session in list(self._sessions.live):
            session.say_goodbye(SHUTTING_DOWN)
        for server in self._servers:
            server.close()
