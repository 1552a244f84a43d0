"""Ingress's span: the receipt of a message (SMTP DATA), the root of the message's trace."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kurrier.core.metrics import MESSAGES_RECEIVED, tenant_label
from kurrier.core.routing import domain_of
from kurrier.core.telemetry import (
    TRACER,
    options,
    set_reply,
    smtp_attributes,
    submitted_context,
    working_on,
)
from opentelemetry.trace import Span, SpanKind


@dataclass
class Receipt:
    """The root span of one message at ingress, and the reply it ends with."""

    span: Span
    tenant: str = ""

    def replied(self, reply: str) -> str:
        """Record the final reply to DATA (and count the message); returns it unchanged."""
        set_reply(self.span, reply)
        if reply.startswith("2"):
            MESSAGES_RECEIVED.add(1, tenant_label(self.tenant))
        return reply


@contextmanager
def receiving(
    *,
    queue_id: str,
    message_id: str,
    mail_from: str,
    recipients: Sequence[str],
    size: int,
    content: bytes,
    peer: Any,
    tenant: str = "",
) -> Iterator[Receipt]:
    """The span of a message's receipt by ingress: the root of its trace."""
    attributes: dict[str, Any] = smtp_attributes(map(domain_of, recipients), len(recipients))
    attributes["kurrier.queue_id"] = queue_id
    attributes["kurrier.message.size"] = size
    if tenant:
        attributes["kurrier.tenant"] = tenant
    if message_id:
        attributes["kurrier.message_id"] = message_id
    if isinstance(peer, tuple) and len(peer) >= 2:
        attributes["client.address"] = str(peer[0])
        attributes["client.port"] = int(peer[1])
    if options.trace_addresses:
        attributes["kurrier.mail_from"] = mail_from
        attributes["kurrier.recipients"] = list(recipients)
    with (
        working_on(queue_id),
        TRACER.start_as_current_span(
            "SMTP DATA",
            context=submitted_context(content),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span,
    ):
        yield Receipt(span, tenant)
