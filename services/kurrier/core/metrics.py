"""Every metric kurrier exports: its name, unit and description, and how it is counted.

The instruments are OpenTelemetry ones on the meter of this module; the
MeterProvider that `kurrier.core.telemetry.setup_telemetry` installs exports
them to the Prometheus registry served on GET /metrics (so
`kurrier.messages.received` is scraped as `kurrier_messages_received_total`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from kurrier.core.smtp_text import enhanced_status, reply_code
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

_METER = metrics.get_meter("kurrier")

MESSAGES_RECEIVED = _METER.create_counter(
    "kurrier.messages.received", unit="{message}", description="Messages accepted by ingress (250)"
)
MESSAGES_REJECTED = _METER.create_counter(
    "kurrier.messages.rejected",
    unit="{message}",
    description="Refusals (4xx and 5xx replies) by ingress, by reply and enhanced status code",
)
MESSAGES_QUEUED = _METER.create_counter(
    "kurrier.messages.queued",
    unit="{message}",
    description="Messages stored by the queue (bounces it generates included)",
)
RECIPIENTS_DELIVERED = _METER.create_counter(
    "kurrier.recipients.delivered", unit="{recipient}", description="Recipients delivered"
)
RECIPIENTS_DEFERRED = _METER.create_counter(
    "kurrier.recipients.deferred",
    unit="{recipient}",
    description="Delivery attempts that ended in a temporary failure, per recipient",
)
RECIPIENTS_BOUNCED = _METER.create_counter(
    "kurrier.recipients.bounced",
    unit="{recipient}",
    description="Recipients given up on: rejected by the next hop, or expired",
)
ROUTING_TABLES_REFUSED = _METER.create_counter(
    "kurrier.routing_table.refused",
    unit="{table}",
    description="Routing tables a service did not take (it keeps the one in use), by reason: "
    "newer (fields this version does not know) or unreadable",
)
TIME_IN_QUEUE = _METER.create_histogram(
    "kurrier.queue.time",
    unit="s",
    description="Time from acceptance to a recipient's final outcome",
    explicit_bucket_boundaries_advisory=[
        1,
        5,
        15,
        60,
        300,
        900,
        1800,
        3600,
        4 * 3600,
        12 * 3600,
        86400,
        2 * 86400,
        5 * 86400,
    ],
)
DELIVERY_ATTEMPTS = _METER.create_counter(
    "kurrier.delivery.attempts",
    unit="{recipient}",
    description="Recipients attempted by delivery, by route, domain, outcome and status code",
)
DELIVERY_DURATION = _METER.create_histogram(
    "kurrier.delivery.duration",
    unit="s",
    description="Duration of one SMTP transaction to a route's next hop",
    explicit_bucket_boundaries_advisory=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
)
TLS_SESSIONS = _METER.create_counter(
    "kurrier.delivery.tls.sessions",
    unit="{session}",
    description="Sessions delivery opened to MX hosts, by policy type (tlsa, sts, "
    "no-policy-found) and result (success, or an RFC 8460 result type)",
)
ATOMIC_BATCHES = _METER.create_counter(
    "kurrier.jetstream.batches",
    unit="{batch}",
    description="Atomic batches of concurrent writes sent to a stream, by stream and outcome: "
    "stored, or refused (then written one by one)",
)
HISTORY_EVENTS_DROPPED = _METER.create_counter(
    "kurrier.history.events.dropped",
    unit="{event}",
    description="Message history events not kept: this process's buffer was full",
)


def tenant_label(tenant: str) -> dict[str, str]:
    """The `tenant` label of the message counters: the namespace whose resources govern
    the message (core/tenancy.py), so at most one series per namespace; none without
    tenancy."""
    return {"tenant": tenant} if tenant else {}


def rejected(reply: str) -> None:
    """Count a refusal (a 4xx or 5xx reply) by ingress, by its codes."""
    code = reply_code(reply)
    MESSAGES_REJECTED.add(1, {"code": str(code), "reason": enhanced_status(reply) or str(code)})


def count_final(status: str, received_at: float, now: float, tenant: str = "") -> None:
    """Count a recipient that reached a final status (delivered, bounced, expired)."""
    if status == "delivered":
        RECIPIENTS_DELIVERED.add(1, tenant_label(tenant))
    else:
        reason = "expired" if status == "expired" else "rejected"
        RECIPIENTS_BOUNCED.add(1, {"reason": reason, **tenant_label(tenant)})
    TIME_IN_QUEUE.record(max(0.0, now - received_at), {"outcome": status})


class Gauge:
    """A gauge read at scrape time from a function the service supplies (absent until then)."""

    def __init__(self, name: str, unit: str, description: str) -> None:
        self._read: Callable[[], float] | None = None
        _METER.create_observable_gauge(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def follow(self, read: Callable[[], float]) -> None:
        self._read = read

    def _observe(self, _: CallbackOptions) -> Iterable[Observation]:
        return [] if self._read is None else [Observation(self._read())]


class StateGauge:
    """How many things are in each state, as last counted (absent until first counted)."""

    def __init__(self, name: str, unit: str, description: str, states: Sequence[str]) -> None:
        self._counts: Mapping[str, float] | None = None
        self._known = tuple(states)
        _METER.create_observable_gauge(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def update(self, counts: Mapping[str, float]) -> None:
        self._counts = counts

    def _observe(self, _: CallbackOptions) -> Iterable[Observation]:
        if self._counts is None:
            return []
        return [Observation(self._counts.get(s, 0), {"state": s}) for s in self._known]


class LabelledGauge:
    """A gauge with one value per set of attributes, as last set (absent until set)."""

    def __init__(self, name: str, unit: str, description: str) -> None:
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        _METER.create_observable_gauge(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def set(self, attributes: Mapping[str, str], value: float) -> None:
        self._values[tuple(sorted(attributes.items()))] = value

    def _observe(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(value, dict(key)) for key, value in self._values.items()]


QUEUE_STATES = ("active", "deferred", "held")
SMTP_SESSIONS = Gauge("kurrier.smtp.sessions", "{session}", "SMTP sessions open at ingress")
QUEUE_DEPTH = StateGauge(
    "kurrier.queue.messages",
    "{message}",
    "Messages in the queue by state, counted from the message records when scraped",
    QUEUE_STATES,
)
QUEUE_OLDEST_AGE = StateGauge(
    "kurrier.queue.oldest_message.age",
    "s",
    "Age of the oldest message in the queue by state (0 when none), read with the depth",
    QUEUE_STATES,
)
NATS_CONNECTED = Gauge(
    "kurrier.nats.connected", "1", "1 while the service is connected to NATS, else 0"
)
TLS_CERTIFICATE_EXPIRY = Gauge(
    "kurrier.tls.certificate.expiry_timestamp",
    "s",
    "When the ingress TLS certificate in use expires (Unix time; absent without TLS)",
)

SITE_CONNECTION_LIMIT = LabelledGauge(
    "kurrier.delivery.site.connection_limit",
    "{connection}",
    "Connections a destination site may have open across all delivery processes, as this"
    " process last read it (lowered while the site is slowed down)",
)
SITE_MESSAGE_LIMIT = LabelledGauge(
    "kurrier.delivery.site.message_limit",
    "{message}",
    "Messages per minute a destination site may be sent across all delivery processes, as"
    " this process last read it (lowered while the site is slowed down)",
)
SITE_SLOWDOWNS = _METER.create_counter(
    "kurrier.delivery.site.slowdowns",
    unit="{slowdown}",
    description="Times a destination site's pace was halved after a 421 or 4.7.x reply",
)
SITE_HELD = _METER.create_counter(
    "kurrier.delivery.site.held",
    unit="{recipient}",
    description="Recipients held back because their destination site was at its limit or"
    " throttling, by site",
)
