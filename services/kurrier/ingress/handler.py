"""The aiosmtpd handler: relay policy at RCPT, durable enqueue before 250 at DATA."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from kurrier.core.message import new_queue_id
from kurrier.core.routing import domain_of
from kurrier.core.table_store import TableFollower
from kurrier.ingress.line_endings import normalise_line_endings
from kurrier.ingress.queue_client import QueueClient, QueueUnavailable
from kurrier.ingress.received import protocol_name, received_header
from kurrier.ingress.relay_policy import check_recipient, check_sender
from kurrier.v1 import queue_pb2

log = logging.getLogger(__name__)

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)
_HEADER_SCAN_LIMIT = 64 * 1024


def message_id_of(content: bytes) -> str:
    headers = content[:_HEADER_SCAN_LIMIT].split(b"\r\n\r\n", 1)[0]
    match = _MESSAGE_ID.search(headers)
    return match.group(1).decode("ascii", errors="replace").strip()[:998] if match else ""


class RelayHandler:
    def __init__(self, tables: TableFollower, queue: QueueClient, hostname: str) -> None:
        self._tables = tables
        self._queue = queue
        self._hostname = hostname

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd handles pipelined commands but does not advertise it.
        return [*responses[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # aiosmtpd spells the null reverse-path "<>" and needs it truthy to know
        # MAIL was given; the queue gets "" (see reverse_path).
        refusal = check_sender(reverse_path(address))
        if refusal:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        table = self._tables.table
        client_ip = peer_ip(session)
        if len(envelope.rcpt_tos) >= table.policy.max_recipients:
            return "452 4.5.3 Too many recipients"
        refusal = check_recipient(
            table,
            client_ip=client_ip,
            authenticated=bool(session.authenticated),
            recipient=address,
            sender_domain=domain_of(envelope.mail_from or ""),
        )
        if refusal:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        queue_id = new_queue_id()
        client_ip = peer_ip(session)
        content = envelope.content
        assert isinstance(content, bytes)  # decode_data=False
        content = normalise_line_endings(content)
        options = [option.upper() for option in envelope.mail_options]
        smtputf8 = "SMTPUTF8" in options
        body_type = next((o[5:] for o in options if o.startswith("BODY=")), "")
        tls = session.ssl is not None
        header = received_header(
            helo=session.host_name or "",
            client_ip=client_ip,
            hostname=self._hostname,
            protocol=protocol_name(
                smtputf8=smtputf8, tls=tls, authenticated=bool(session.authenticated)
            ),
            queue_id=queue_id,
            recipients=envelope.rcpt_tos,
            timestamp=time.time(),
        )
        request = queue_pb2.Envelope(
            queue_id=queue_id,
            mail_from=reverse_path(envelope.mail_from),
            recipients=envelope.rcpt_tos,
            client_address=client_ip,
            client_helo=session.host_name or "",
            authenticated_as=_identity(session),
            smtputf8=smtputf8,
            body_type=body_type,
            size=len(header) + len(content),
            message_id_header=message_id_of(content),
        )
        try:
            await self._queue.enqueue(request, [header, content])
        except QueueUnavailable as error:
            log.warning("not accepted, queue unavailable: %s", error, extra={"queue_id": queue_id})
            return "451 4.3.0 Queue temporarily unavailable, try again later"
        return f"250 2.0.0 Ok: queued as {queue_id}"


def reverse_path(mail_from: str | None) -> str:
    """The sender as the queue stores it: "" for the null sender."""
    return "" if mail_from in (None, "<>") else mail_from


def peer_ip(session: Session) -> str:
    peer: Any = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")


def _identity(session: Session) -> str:
    data: Any = session.auth_data
    if not session.authenticated or data is None:
        return ""
    login = getattr(data, "login", data)
    return login.decode() if isinstance(login, bytes) else str(login)
