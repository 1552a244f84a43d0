"""One delivery attempt of one message: routes, next hops, failover, and each recipient's fate.

Knows nothing of JetStream (the worker does): given a job, its body and the
live routing table, it returns an outcome per recipient.
"""

from __future__ import annotations

import asyncio
import logging

from kurrier.core.cluster_slots import Hold
from kurrier.core.dsn_parameters import MailParameters, RcptParameters, notify_allows
from kurrier.core.history import HISTORY
from kurrier.core.message import DeliveryJob, Outcome, RecipientOutcome
from kurrier.core.metrics import SITE_HELD
from kurrier.core.routing import CompiledRoute, RoutingTable, domain_of
from kurrier.delivery import require_tls
from kurrier.delivery.connection_pool import ConnectionPool, Opener
from kurrier.delivery.dane import DaneDns, TlsaRecords
from kurrier.delivery.dkim_signer import DkimSigner
from kurrier.delivery.mail_exchangers import MailDns, MailHost, UnroutableDomain
from kurrier.delivery.message_forms import MessageForms
from kurrier.delivery.mta_sts import StsPolicies
from kurrier.delivery.next_hop import NextHop, mx_hops, smarthost_hop
from kurrier.delivery.require_tls import TlsDemand
from kurrier.delivery.sending_rate import SendingRates
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.site_shaping import (
    SLOT_IDLE_TIMEOUT,
    SiteBusy,
    SiteShaping,
    is_throttling,
)
from kurrier.delivery.sites import Site, site_of
from kurrier.delivery.smtp_client import Reply, SmtpSession, SmtpTemporaryError, TlsUnavailable
from kurrier.delivery.spans import traced_delivery
from kurrier.delivery.tls_policy import client_context
from kurrier.delivery.tls_reports import TlsReports
from pydantic import Field

log = logging.getLogger(__name__)


def outcome_of(recipient: str, reply: Reply) -> RecipientOutcome:
    outcome: Outcome
    if reply.ok:
        outcome = "delivered"
    elif reply.permanent:
        outcome = "bounced"
    else:
        outcome = "deferred"
    return RecipientOutcome(address=recipient, outcome=outcome, reply=str(reply))


def owes_success_notice(job: DeliveryJob, recipient: str, session: SmtpSession) -> bool:
    """Whether the sender asked to hear of the recipient's delivery and this next
    hop, not offering DSN, will not pass the request on (RFC 3461 5.2.2)."""
    given = job.recipient_dsn.get(recipient)
    notify = given.notify if given is not None else ""
    return not session.offers_dsn and notify_allows(notify, "SUCCESS")


def deferred(recipients: list[str], text: str) -> list[RecipientOutcome]:
    return [RecipientOutcome(address=r, outcome="deferred", reply=text) for r in recipients]


class HeldOutcome(RecipientOutcome):
    """Deferred by traffic shaping: the site is at its limit or asked to slow down,
    and nothing was refused. The worker may give the job back to come again in
    retry_in seconds rather than count an attempt."""

    retry_in: float = Field(default=0.0, exclude=True)


def held(site: Site, recipients: list[str], reply: str, retry_in: float) -> list[RecipientOutcome]:
    SITE_HELD.add(len(recipients), {"site": site.name})
    return [
        HeldOutcome(address=r, outcome="deferred", reply=reply, retry_in=retry_in)
        for r in recipients
    ]


def attempted(
    job: DeliveryJob,
    recipients: list[str],
    hop: NextHop | None,
    reply: str,
    session: SmtpSession | None = None,
) -> None:
    """Write one attempt into each recipient's history: at a next hop, or (hop None)
    one that ended before any was asked (no route, no usable next hop, the rate)."""
    for recipient in recipients:
        HISTORY.record(
            job.queue_id,
            "attempt",
            attempt=job.dispatch,
            recipient=recipient,
            hop=hop.label if hop is not None else "",
            tls="" if hop is None else "yes" if session is not None and session.tls else "no",
            reply=reply,
        )


def unattempted(job: DeliveryJob, outcomes: list[RecipientOutcome]) -> list[RecipientOutcome]:
    """Outcomes decided without a next hop, written into the history as such."""
    for outcome in outcomes:
        attempted(job, [outcome.address], None, outcome.reply)
    return outcomes


class Courier:
    def __init__(self, settings: DeliverySettings) -> None:
        self._settings = settings
        self.pool = ConnectionPool(closed=self._session_closed)
        # Traffic shaping across delivery processes; None (per-process limits only)
        # when the courier runs without NATS.
        self.shaping: SiteShaping | None = None
        # The cluster-wide slot each open session holds, by id(session).
        self._slots: dict[int, Hold] = {}
        self._dns = MailDns(settings.dns_resolver)
        verify = client_context("verify", settings.tls_ca_file)
        assert verify is not None
        self.sts = StsPolicies(self._dns, verify)
        self._signer = DkimSigner()
        self.tls_reports = TlsReports(settings.helo_name)
        self._dane = (
            DaneDns(settings.dns_resolver, settings.connect_timeout) if settings.dane else None
        )
        self._rates = SendingRates()

    async def deliver(
        self, job: DeliveryJob, body: bytes, table: RoutingTable
    ) -> list[RecipientOutcome]:
        sender_domain = domain_of(job.mail_from)
        # One group per route; an MX route splits further by recipient domain.
        groups: dict[tuple[str, str], tuple[CompiledRoute | None, list[str]]] = {}
        for recipient in job.recipients:
            domain = domain_of(recipient)
            route = table.route_for(domain, sender_domain, job.tenant)
            key = (route.name if route else "", domain if route and route.mx else "")
            groups.setdefault(key, (route, []))[1].append(recipient)
        # Signed once per form the attempt's hops need, whatever the number of groups.
        signing_domain = table.domain(sender_domain)
        forms = MessageForms(
            body,
            declared_smtputf8=job.smtputf8,
            sign=lambda content: self._signer.sign(content, signing_domain),
        )
        demand = require_tls.demand_of(job.require_tls, body)
        results = await asyncio.gather(
            *(
                traced_delivery(
                    table,
                    route,
                    recipients,
                    self._deliver_group(job, route, domain, recipients, forms, demand),
                    job.tenant,
                )
                for (_, domain), (route, recipients) in groups.items()
            )
        )
        return [outcome for group in results for outcome in group]

    async def _deliver_group(
        self,
        job: DeliveryJob,
        route: CompiledRoute | None,
        domain: str,
        recipients: list[str],
        forms: MessageForms,
        demand: TlsDemand,
    ) -> list[RecipientOutcome]:
        if route is None:
            return unattempted(
                job, deferred(recipients, "451 4.4.0 no route matches the recipient domain")
            )
        if route.problem:
            return unattempted(
                job,
                deferred(recipients, f"451 4.3.5 route {route.name} is unusable: {route.problem}"),
            )
        try:
            hops = await self._hops(route, domain, demand)
        except UnroutableDomain as error:
            outcome: Outcome = "bounced" if error.permanent else "deferred"
            return unattempted(
                job,
                [
                    RecipientOutcome(address=r, outcome=outcome, reply=error.reply)
                    for r in recipients
                ],
            )
        site = site_of(route, hops)
        if self.shaping is not None:
            try:
                await self.shaping.message(site, route)
            except SiteBusy as busy:
                return unattempted(job, held(site, recipients, busy.reply, busy.retry_in))
        if route.rate_per_minute is not None:
            wait = self._rates.reserve(route.name, route.rate_per_minute)
            if wait is None:
                return unattempted(
                    job,
                    deferred(
                        recipients,
                        f"451 4.7.0 route {route.name} is at its rate limit "
                        f"({route.rate_per_minute} per minute)",
                    ),
                )
            await asyncio.sleep(wait)
        return await self._send(job, route, site, hops, recipients, forms)

    async def _hops(self, route: CompiledRoute, domain: str, demand: TlsDemand) -> list[NextHop]:
        tls_mode = require_tls.hop_tls_mode(route.tls_mode, demand)
        if route.smarthost is not None:
            return [smarthost_hop(*route.smarthost, tls_mode)]
        hosts = await self._dns.mail_hosts(domain)
        # "TLS-Required: No" sets recipient-side policy aside: MTA-STS and DANE alike.
        policy = None if demand == "optional" else await self.sts.policy_for(domain)
        tlsa = {} if demand == "optional" else await self._tlsa(domain, hosts)
        if demand == "required" and (policy is None or policy.mode != "enforce"):
            # Without MTA-STS, only hosts DANE authenticates may take REQUIRETLS mail.
            hosts = [host for host in hosts if host.name in tlsa and tlsa[host.name].usable]
            if not hosts:
                raise UnroutableDomain(require_tls.unauthenticated_mx(domain))
        return mx_hops(domain, hosts, tls_mode, policy, self._settings.mx_port, tlsa)

    async def _tlsa(self, domain: str, hosts: list[MailHost]) -> dict[str, TlsaRecords]:
        """The secure TLSA records of each host DANE applies to (none with --dane off)."""
        if self._dane is None:
            return {}
        port = self._settings.mx_port
        found = await asyncio.gather(*(self._dane.tlsa(domain, h.name, port) for h in hosts))
        return {h.name: records for h, records in zip(hosts, found, strict=True) if records}

    async def _release(self, key: str, session: SmtpSession) -> None:
        """Back to the pool for reuse, unless another process waits for its site slot."""
        hold = self._slots.get(id(session))
        if hold is None or self.shaping is None:
            await self.pool.release(key, session, reusable=True)
            return
        wanted = await self.shaping.wanted(hold)
        await self.pool.release(key, session, not wanted, SLOT_IDLE_TIMEOUT)

    async def _slot_unused(self, hold: Hold | None) -> None:
        """A slot taken for a connection that did not open."""
        if hold is not None and self.shaping is not None:
            await self.shaping.closed(hold)

    async def _session_closed(self, session: SmtpSession) -> None:
        hold = self._slots.pop(id(session), None)
        if hold is not None and self.shaping is not None:
            await self.shaping.closed(hold)

    async def _throttled(self, site: Site, route: CompiledRoute, reply: str) -> None:
        """If reply asks the site's senders to slow down, the site is slowed."""
        if self.shaping is not None and is_throttling(reply):
            await self.shaping.throttled(site, route, reply)

    async def _shaping_feedback(
        self, site: Site, route: CompiledRoute, replies: list[Reply]
    ) -> None:
        """A transaction's replies slow the site down, or let it speed up again."""
        if self.shaping is None:
            return
        throttling = next((str(r) for r in replies if is_throttling(str(r))), None)
        if throttling is not None:
            await self._throttled(site, route, throttling)
        elif any(reply.ok for reply in replies):
            await self.shaping.succeeded(site, route)

    def _opener(self, hop: NextHop, route: CompiledRoute, site: Site) -> Opener:
        # Only the smarthost the route names ever sees its credentials.
        credentials = None
        if route.smarthost is not None and route.username is not None:
            credentials = (route.username, route.password or "")

        async def open_session() -> SmtpSession:
            hold = await self.shaping.connection(site, route) if self.shaping else None
            try:
                session = await self._open(hop, credentials)
            except TlsUnavailable as error:
                self.tls_reports.record(hop, error.result_type)
                await self._slot_unused(hold)
                raise
            except BaseException:
                await self._slot_unused(hold)
                raise
            if hop.tls_mode != "none":
                self.tls_reports.record(hop, None if session.tls else "starttls-not-supported")
            if hold is not None:
                self._slots[id(session)] = hold
            return session

        return open_session

    async def _open(self, hop: NextHop, credentials: tuple[str, str] | None) -> SmtpSession:
        settings = self._settings
        return await SmtpSession.open(
            hop.address,
            hop.port,
            server_name=hop.server_name,
            helo_name=settings.helo_name,
            tls_mode=hop.tls_mode,
            tls_context=client_context(hop.tls_mode, settings.tls_ca_file),
            timeout=settings.smtp_timeout,
            connect_timeout=settings.connect_timeout,
            credentials=credentials,
            tlsa=hop.tlsa,
        )

    async def _send(
        self,
        job: DeliveryJob,
        route: CompiledRoute,
        site: Site,
        hops: list[NextHop],
        recipients: list[str],
        forms: MessageForms,
    ) -> list[RecipientOutcome]:
        """Try the hops in order; a recipient moves on only after a temporary failure
        before the server saw the message content (RFC 5321 5.1).

        Recipients the site would not take because it is at its limit are held
        (HeldOutcome): no next hop was asked. A throttling reply slows the site
        down, and is an attempt like any other temporary failure."""
        outcomes: list[RecipientOutcome] = []
        pending = recipients
        # The last temporary failure; and, for REQUIRETLS, why the last hop reached
        # could not take the message: the bounce when no hop failed only for now.
        last_reply = ""
        tls_refusal: Reply | None = None
        to_try = list(hops)
        retried: set[NextHop] = set()
        while to_try:
            hop = to_try.pop(0)
            # Sessions differ by TLS mode and credentials: same key only if those agree.
            key = f"{hop.label}|{hop.tls_mode}|{route.username if route.smarthost else ''}"
            try:
                session = await self.pool.acquire(
                    key, route.max_connections, self._opener(hop, route, site)
                )
            except SiteBusy as busy:
                return outcomes + held(site, pending, busy.reply, busy.retry_in)
            except SmtpTemporaryError as error:
                failure = f"451 {error.status} {hop.label}: {error}"
                log.info("next hop failed: %s", failure, extra={"queue_id": job.queue_id})
                attempted(job, pending, hop, failure)
                if job.require_tls and isinstance(error, TlsUnavailable):
                    tls_refusal = require_tls.unable(hop.label, str(error))
                else:
                    last_reply = failure
                    await self._throttled(site, route, error.reply)
                continue
            if job.require_tls and (refusal := require_tls.session_refusal(session, hop.label)):
                await self._release(key, session)
                attempted(job, pending, hop, str(refusal), session)
                tls_refusal = refusal
                continue
            form = forms.for_hop(session.extensions, job.mail_from, pending, hop.label)
            if isinstance(form, Reply):
                # The hop cannot take the message: like a 5xx to MAIL, no other is asked.
                await self._release(key, session)
                attempted(job, pending, hop, str(form), session)
                outcomes += [outcome_of(recipient, form) for recipient in pending]
                pending = []
                break
            try:
                result = await session.send(
                    job.mail_from,
                    pending,
                    form.body,
                    smtputf8=form.smtputf8,
                    body_type=form.body_type,
                    dsn=MailParameters(ret=job.dsn_ret, envid=job.dsn_envid),
                    recipient_dsn={
                        address: RcptParameters(notify=given.notify, orcpt=given.orcpt)
                        for address, given in job.recipient_dsn.items()
                    },
                    require_tls=job.require_tls,
                )
            except SmtpTemporaryError as error:
                await self.pool.release(key, session, reusable=False)
                last_reply = f"451 4.4.2 {hop.label}: {error}"
                attempted(job, pending, hop, last_reply, session)
                if session.body_started:
                    # The server may have the message: another host could duplicate it.
                    break
                if session.transactions > 1 and hop not in retried:
                    # A pooled session the server had closed meanwhile: once more, afresh.
                    retried.add(hop)
                    to_try.insert(0, hop)
                continue
            except BaseException:
                await self.pool.release(key, session, reusable=False)
                raise
            await self._release(key, session)
            await self._shaping_feedback(site, route, [result.reply_for(r) for r in pending])
            retry_elsewhere = []
            for recipient in pending:
                reply = result.reply_for(recipient)
                attempted(job, [recipient], hop, str(reply), session)
                if (
                    not reply.ok
                    and not reply.permanent
                    and result.decided_before_content(recipient)
                ):
                    retry_elsewhere.append(recipient)
                    last_reply = str(reply)
                else:
                    outcome = outcome_of(recipient, reply)
                    outcome.relayed = outcome.outcome == "delivered" and owes_success_notice(
                        job, recipient, session
                    )
                    outcomes.append(outcome)
            pending = retry_elsewhere
            if not pending:
                break
        if tls_refusal is not None and not last_reply:
            return outcomes + [outcome_of(recipient, tls_refusal) for recipient in pending]
        return outcomes + deferred(pending, last_reply)
