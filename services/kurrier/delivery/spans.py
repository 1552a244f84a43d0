"""Delivery's span: one SMTP transaction to a route's next hop, with its metrics.

Its other spans are the shared ones of kurrier.core.telemetry: processing
a job (consuming) and publishing its result (publishing).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Awaitable, Sequence
from typing import Any

from kurrier.core.message import RecipientOutcome
from kurrier.core.metrics import DELIVERY_ATTEMPTS, DELIVERY_DURATION
from kurrier.core.routing import CompiledRoute, RoutingTable, domain_of
from kurrier.core.smtp_text import enhanced_status, reply_code
from kurrier.core.telemetry import TRACER, options, set_reply, smtp_attributes
from opentelemetry.trace import SpanKind


def metric_domain(table: RoutingTable, route: CompiledRoute | None, domain: str) -> str:
    """A recipient domain as a metric label: only domains the configuration names.

    Mail can go to any domain on the internet; a label per domain would grow
    the metrics without bound, so everything else is 'other'.
    """
    if table.domain(domain) is not None:
        return domain
    return domain if route is not None and domain in route.recipient_domains else "other"


async def traced_delivery(
    table: RoutingTable,
    route: CompiledRoute | None,
    recipients: Sequence[str],
    work: Awaitable[list[RecipientOutcome]],
    tenant: str = "",
) -> list[RecipientOutcome]:
    """One SMTP transaction to the next hop of a route: its span, latency and outcomes."""
    route_name = route.name if route else ""
    attributes: dict[str, Any] = smtp_attributes(map(domain_of, recipients), len(recipients))
    attributes["kurrier.route"] = route_name
    if tenant:
        attributes["kurrier.tenant"] = tenant
    if route is not None and route.smarthost is not None:
        attributes["server.address"], attributes["server.port"] = route.smarthost
    started = time.monotonic()
    with TRACER.start_as_current_span(
        "SMTP send", kind=SpanKind.CLIENT, attributes=attributes
    ) as span:
        outcomes = await work
        DELIVERY_DURATION.record(time.monotonic() - started, {"route": route_name})
        tally = Tally(o.outcome for o in outcomes)
        for outcome in outcomes:
            domain = domain_of(outcome.address)
            code = reply_code(outcome.reply)
            DELIVERY_ATTEMPTS.add(
                1,
                {
                    "route": route_name,
                    "domain": metric_domain(table, route, domain),
                    "outcome": outcome.outcome,
                    "status": enhanced_status(outcome.reply) or str(code),
                },
            )
            event: dict[str, Any] = {
                "kurrier.outcome": outcome.outcome,
                "kurrier.recipient.domain": domain,
                "kurrier.smtp.reply_code": code,
            }
            if options.trace_addresses:
                event["kurrier.recipient"] = outcome.address
                event["kurrier.smtp.reply"] = outcome.reply
            span.add_event("recipient", event)
        span.set_attributes({f"kurrier.recipients.{k}": v for k, v in tally.items()})
        if outcomes:
            # The worst reply is the one that explains the attempt.
            set_reply(span, max((o.reply for o in outcomes), key=reply_code))
        return outcomes
