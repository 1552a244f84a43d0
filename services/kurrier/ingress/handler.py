"""The aiosmtpd handler: AUTH, relay policy and limits per command, durable enqueue before 250."""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session
from kurrier.core.cluster_counters import CountersUnavailable
from kurrier.core.domains import InvalidDomain, canonical_address, normalise_domain
from kurrier.core.dsn_parameters import (
    MAIL_KEYWORDS,
    RCPT_KEYWORDS,
    BadParameter,
    given_once,
    mail_parameters,
    rcpt_parameters,
)
from kurrier.core.history import HISTORY
from kurrier.core.message import new_queue_id
from kurrier.core.routing import CompiledPolicy, domain_of
from kurrier.core.smtp_text import header_section
from kurrier.core.table_store import TableFollower
from kurrier.core.tenancy import check_tenant_sender, inbound_tenant, is_tenant, tenant_of
from kurrier.ingress import require_tls
from kurrier.ingress.auth_failures import AuthFailures
from kurrier.ingress.connection_gate import client_key
from kurrier.ingress.identities import Identities
from kurrier.ingress.message_rates import MessageRates
from kurrier.ingress.queue_client import QueueClient, QueueFull, QueueUnavailable
from kurrier.ingress.received import protocol_name, received_header, tls_description
from kurrier.ingress.relay_policy import (
    check_recipient,
    check_sender,
    check_sender_identity,
    recipient_key,
)
from kurrier.ingress.smtp_session import NULL_PATH, IngressSMTP, RelayEnvelope
from kurrier.ingress.spans import receiving
from kurrier.ingress.tenant_quotas import TenantQuotas
from kurrier.ingress.token_review import Review
from kurrier.v1 import queue_pb2

log = logging.getLogger(__name__)

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)

AUTH_NOT_HERE = "503 5.5.1 AUTH is only offered on the submission ports"
AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_LOCKED_OUT = "421 4.7.0 Too many failed authentication attempts, try again later"
AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure, try again later"
# RFC 5321 3.3: a client retries a 452 recipient in a later transaction.
OTHER_TENANT = "452 4.5.3 Recipients of another tenant go in a transaction of their own"


def message_id_of(content: bytes) -> str:
    match = _MESSAGE_ID.search(header_section(content))
    return match.group(1).decode("ascii", errors="replace").strip()[:998] if match else ""


def decode_plain(blob: bytes) -> tuple[bytes, bytes] | None:
    """(login, password) from a SASL PLAIN message (RFC 4616), or None if malformed.

    An authorization identity other than the login (acting for someone else) is
    not supported, so it is refused rather than ignored.
    """
    parts = blob.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        return None
    authzid, login, password = parts
    if authzid and authzid != login:
        return None
    return login, password


def sender_of(envelope: Envelope) -> str:
    """MAIL FROM as the queue stores it: '' for the null reverse-path."""
    mail_from = envelope.mail_from or ""
    return "" if mail_from == NULL_PATH else mail_from


class RelayHandler:
    def __init__(
        self,
        tables: TableFollower,
        queue: QueueClient,
        hostname: str,
        identities: Identities,
        rates: MessageRates,
        quotas: TenantQuotas,
        auth_failures: AuthFailures,
    ) -> None:
        self._tables = tables
        self._queue = queue
        self._hostname = hostname
        try:  # "<postmaster>" is the postmaster at the hostname (smtp_session.py)
            self._postmaster_domain = normalise_domain(hostname)
        except InvalidDomain:
            self._postmaster_domain = ""
        self._identities = identities
        self._failures = auth_failures
        self._rates = rates
        self._quotas = quotas

    # -- EHLO and AUTH ----------------------------------------------------------------

    def _auth_allowed(self, server: SMTP, session: Session, policy: CompiledPolicy) -> bool:
        offered = isinstance(server, IngressSMTP) and server.listener.offers_auth
        can_verify = bool(policy.users or policy.service_account_audience)
        secured = session.ssl is not None or not policy.require_tls_for_auth
        return offered and can_verify and secured

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        policy = self._tables.table.policy
        keep = [line for line in responses[:-1] if not line.startswith("250-AUTH")]
        if self._auth_allowed(server, session, policy):
            keep.append("250-AUTH LOGIN PLAIN")
        # aiosmtpd handles pipelined commands but does not advertise it.
        return [
            *keep,
            f"250-SIZE {policy.max_message_size}",
            "250-PIPELINING",
            "250-DSN",
            "250-ENHANCEDSTATUSCODES",
            "250-CHUNKING",
            *(["250-REQUIRETLS"] if require_tls.offered(session) else []),
            responses[-1],
        ]

    async def handle_AUTH(
        self, server: SMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> Any:
        """Refuse AUTH where it is not offered; MISSING lets the mechanism run."""
        policy = self._tables.table.policy
        if not (isinstance(server, IngressSMTP) and server.listener.offers_auth):
            return AUTH_NOT_HERE
        if session.ssl is None and policy.require_tls_for_auth:
            return AUTH_NEEDS_TLS
        try:
            if await self._failures.locked_out(client_key(peer_ip(session))):
                return AUTH_LOCKED_OUT
        except CountersUnavailable:
            return AUTH_TEMPORARY
        return MISSING

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        blob = await _initial_or_challenge(server, args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        credentials = decode_plain(blob)
        if credentials is None:
            await server.push("501 5.5.2 Cannot decode the PLAIN message")
            return AuthResult(success=False, handled=True)
        return await self._authenticate(server, *credentials)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        login = await _initial_or_challenge(server, args, server.AuthLoginUsernameChallenge)
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await _initial_or_challenge(server, [], server.AuthLoginPasswordChallenge)
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._authenticate(server, login, password)

    async def _authenticate(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        assert server.session is not None
        client_ip = peer_ip(server.session)
        verdict = await self._identities.verify(self._tables.table.policy, login, password)
        if isinstance(verdict, str):
            log.info("AUTH from %s as %s", client_ip, verdict)
            return AuthResult(success=True, auth_data=verdict)
        if verdict is Review.UNAVAILABLE:
            return AuthResult(success=False, handled=False, message=AUTH_TEMPORARY)
        await self._failures.count(client_key(client_ip))
        # Neither login nor password is logged: a password typed as the login is common.
        log.info("AUTH failed from %s", client_ip)
        return AuthResult(success=False, handled=False)

    # -- the transaction --------------------------------------------------------------

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        reply = await self._mail(server, session, envelope, address, mail_options)
        _log_refusal("MAIL", reply, session, address, "")
        return reply

    async def _mail(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        try:
            dsn = mail_parameters(_dsn_given(server, session, MAIL_KEYWORDS))
            tls_required = isinstance(server, IngressSMTP) and require_tls.asked(
                server.require_tls_given
            )
        except BadParameter as error:
            return f"501 5.5.4 {error}"
        if tls_required and not require_tls.offered(session):
            return require_tls.NEEDS_TLS
        sender = "" if address == NULL_PATH else address
        refusal = check_sender(sender)
        if refusal:
            return refusal
        if not sender.isascii() and "SMTPUTF8" not in mail_options:
            return f"553 5.6.7 <{sender}>: a non-ASCII address needs SMTPUTF8"
        table = self._tables.table
        policy = table.policy
        size = next((o[5:] for o in mail_options if o.startswith("SIZE=")), "0")
        if int(size) > policy.max_message_size:
            return "552 5.3.4 Message size exceeds fixed maximum message size"
        client_ip = peer_ip(session)
        identity = _identity(session)
        trusted = table.is_trusted(client_ip)
        tenant = tenant_of(table, identity, client_ip)
        if tenant is not None and is_tenant(table, tenant):
            refusal = check_tenant_sender(table, tenant, identity, sender)
        else:
            refusal = check_sender_identity(policy, identity, trusted, sender)
        if refusal:
            return refusal
        client = client_key(client_ip) if table.limits_client(client_ip) else None
        refusal = await self._rates.spend(policy, client, identity)
        if refusal:
            return refusal
        # Every later decision, and the next hop, sees the domain as A-labels (core/domains.py).
        envelope.mail_from = canonical_address(address)
        envelope.mail_options.extend(mail_options)
        if isinstance(envelope, RelayEnvelope):
            envelope.dsn = dsn
            envelope.require_tls = tls_required
            envelope.tenant = tenant
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = await self._rcpt(server, session, envelope, address, rcpt_options)
        _log_refusal("RCPT", reply, session, envelope.mail_from or "", address)
        return reply

    async def _rcpt(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address == NULL_PATH:
            return "501 5.1.3 The null path <> is no recipient"
        try:
            dsn = rcpt_parameters(_dsn_given(server, session, RCPT_KEYWORDS))
            if isinstance(server, IngressSMTP) and server.require_tls_given:
                raise BadParameter(f"{require_tls.KEYWORD} is not a parameter of this command")
        except BadParameter as error:
            return f"501 5.5.4 {error}"
        if not self._tables.loaded.is_set():
            # Before the first routing table, every domain would look foreign:
            # a temporary answer, never a permanent 554 for legitimate mail.
            return "451 4.3.0 Relay starting up, try again shortly"
        table = self._tables.table
        client_ip = peer_ip(session)
        if not address.isascii() and not envelope.smtp_utf8:
            return f"553 5.6.7 <{address}>: a non-ASCII address needs SMTPUTF8"
        # A recipient given again is the same mailbox with the same decisions: 250,
        # as Postfix answers, but one copy, and one recipient of maxRecipients.
        key = recipient_key(address)
        keys = _recipient_keys(envelope)
        if key is not None and key in keys:
            return "250 2.1.5 Ok"
        if len(envelope.rcpt_tos) >= table.policy.max_recipients:
            return "452 4.5.3 Too many recipients"
        identified = tenant_of(table, _identity(session), client_ip)
        refusal = check_recipient(
            table,
            client_ip=client_ip,
            authenticated=bool(session.authenticated),
            recipient=address,
            sender_domain=domain_of(sender_of(envelope)),
            tenant=identified,
            postmaster_domain=self._postmaster_domain,
        )
        if refusal:
            return refusal
        recipient = canonical_address(address)
        if isinstance(envelope, RelayEnvelope):
            tenant = identified
            if tenant is None:
                tenant = inbound_tenant(table, domain_of(recipient))
                if envelope.rcpt_tos and envelope.tenant not in (None, tenant):
                    return OTHER_TENANT
            quota = table.policy.quota_for(tenant) if is_tenant(table, tenant) else None
            if quota is not None:
                refusal = await self._quotas.spend(quota, tenant, not envelope.rcpt_tos)
                if refusal:
                    return refusal
            envelope.tenant = tenant
        envelope.rcpt_tos.append(recipient)
        envelope.rcpt_options.extend(rcpt_options)
        if key is not None:
            keys.add(key)
        if isinstance(envelope, RelayEnvelope) and (dsn.notify or dsn.orcpt):
            envelope.recipient_dsn[recipient] = dsn
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        queue_id = new_queue_id()
        content = envelope.content
        assert isinstance(content, bytes)  # decode_data=False
        with receiving(
            queue_id=queue_id,
            message_id=message_id_of(content),
            mail_from=envelope.mail_from or "",
            recipients=envelope.rcpt_tos,
            size=len(content),
            content=content,
            peer=session.peer,
            tenant=(envelope.tenant or "") if isinstance(envelope, RelayEnvelope) else "",
        ) as receipt:
            return receipt.replied(await self._accept(queue_id, session, envelope))

    async def _accept(self, queue_id: str, session: Session, envelope: Envelope) -> str:
        """Hand the message to the queue; the reply to DATA (250 only once it is stored)."""
        client_ip = peer_ip(session)
        content = envelope.content
        assert isinstance(content, bytes)  # decode_data=False; DataReader normalised it
        options = [option.upper() for option in envelope.mail_options]
        smtputf8 = "SMTPUTF8" in options
        body_type = next((o[5:] for o in options if o.startswith("BODY=")), "")
        tls = session.ssl is not None
        received_at = time.time()
        header = received_header(
            helo=session.host_name or "",
            client_ip=client_ip,
            hostname=self._hostname,
            protocol=protocol_name(
                smtputf8=smtputf8, tls=tls, authenticated=bool(session.authenticated)
            ),
            queue_id=queue_id,
            recipients=envelope.rcpt_tos,
            timestamp=received_at,
            tls_detail=tls_description(session.ssl),
        )
        request = queue_pb2.Envelope(
            queue_id=queue_id,
            mail_from=sender_of(envelope),
            recipients=envelope.rcpt_tos,
            client_address=client_ip,
            client_helo=session.host_name or "",
            authenticated_as=_identity(session),
            client_trusted=self._tables.table.is_trusted(client_ip),
            smtputf8=smtputf8,
            body_type=body_type,
            size=len(header) + len(content),
            message_id_header=message_id_of(content),
        )
        if isinstance(envelope, RelayEnvelope):
            request.tenant = envelope.tenant or ""
            request.dsn_ret = envelope.dsn.ret
            request.dsn_envid = envelope.dsn.envid
            request.require_tls = envelope.require_tls
            request.recipient_dsn.extend(
                queue_pb2.RecipientDsn(address=address, notify=dsn.notify, orcpt=dsn.orcpt)
                for address, dsn in envelope.recipient_dsn.items()
            )
        try:
            await self._queue.enqueue(request, [header, content])
        except QueueFull as error:
            log.warning("not accepted, queue full: %s", error, extra={"queue_id": queue_id})
            reply = "452 4.3.1 Insufficient system storage, try again later"
        except QueueUnavailable as error:
            log.warning("not accepted, queue unavailable: %s", error, extra={"queue_id": queue_id})
            reply = "451 4.3.0 Queue temporarily unavailable, try again later"
        else:
            reply = ""
        # A message refused here is in the history too, under the queue id it
        # would have had: the answer to "what became of my mail to bob?".
        HISTORY.record(
            queue_id,
            "rejected" if reply else "received",
            at=received_at,
            client=client_ip,
            helo=request.client_helo,
            identity=request.authenticated_as,
            tenant=request.tenant,
            tls=tls_description(session.ssl) if tls else "",
            sender=f"<{request.mail_from}>",
            recipients=", ".join(request.recipients),
            size=request.size,
            message_id=request.message_id_header,
            reply=reply,
        )
        return reply or f"250 2.0.0 Ok: queued as {queue_id}"


async def _initial_or_challenge(server: SMTP, args: list[str], challenge: str) -> bytes | None:
    """The client's base64 answer: given with AUTH (args[1]) or after a 334 challenge.

    None when the exchange failed; the client has then been told why.
    """
    if len(args) > 1:
        try:
            return base64.b64decode(args[1], validate=True)
        except binascii.Error:
            await server.push("501 5.5.2 Cannot decode base64")
            return None
    try:
        answer = await server.challenge_auth(challenge)
    except ValueError:  # a line longer than the stream's limit
        await server.push("500 5.5.6 Authentication exchange line is too long")
        return None
    return answer if isinstance(answer, bytes) else None


def _dsn_given(server: SMTP, session: Session, keywords: tuple[str, ...]) -> dict[str, str]:
    """The DSN parameters given with this MAIL or RCPT (IngressSMTP took them out of
    the line); BadParameter when they do not belong there."""
    if not isinstance(server, IngressSMTP):
        return {}
    given = given_once(server.dsn_given)
    if given and not session.extended_smtp:
        raise BadParameter("DSN parameters need EHLO")
    misplaced = sorted(set(given) - set(keywords))
    if misplaced:
        raise BadParameter(f"{misplaced[0]} is not a parameter of this command")
    return given


def _recipient_keys(envelope: Envelope) -> set[tuple[str, str]]:
    """The recipient keys of envelope's recipients so far."""
    if isinstance(envelope, RelayEnvelope):
        return envelope.recipient_keys
    return {key for key in map(recipient_key, envelope.rcpt_tos) if key is not None}


def _log_refusal(command: str, reply: str, session: Session, sender: str, recipient: str) -> None:
    """A refused MAIL or RCPT, as Postfix logs its NOQUEUE rejects: no message exists
    yet, so the log is the only place that says why a client's mail was refused."""
    if reply[:1] not in ("4", "5"):
        return
    log.info(
        "refused %s from %s: %s; from=<%s>%s helo=<%s>",
        command,
        peer_ip(session),
        reply,
        "" if sender == NULL_PATH else sender,
        f" to=<{recipient}>" if recipient else "",
        session.host_name or "",
    )


def peer_ip(session: Session) -> str:
    peer: Any = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")


def _identity(session: Session) -> str:
    data: Any = session.auth_data
    if not session.authenticated or data is None:
        return ""
    return data.decode() if isinstance(data, bytes) else str(data)
