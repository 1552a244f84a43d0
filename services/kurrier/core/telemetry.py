"""OpenTelemetry for every kurrier service: one trace per message, one metrics registry.

`setup_telemetry` is the only place the SDK is configured, from the standard
OTEL_* variables alone. With no exporter asked for, tracing stays the API's
no-op (no span is recorded, nothing is exported on the hot path); metrics
always go to a Prometheus registry that each service serves on GET /metrics.

A message's trace starts at ingress (or continues a submitted `Traceparent:`
header, when trusted), crosses gRPC in metadata (the grpc instrumentation's
interceptors) and JetStream in W3C headers on every job and result. The
queue keeps the message's traceparent in its record, so a retry dispatched
hours later and the bounce of a failed message join the original trace.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import prometheus_client
from kurrier.core.logs import current_queue_id
from kurrier.core.message import FINAL_STATUSES, MessageRecord, RecipientOutcome
from kurrier.core.routing import CompiledRoute, RoutingTable, domain_of
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER = trace.get_tracer("kurrier")
_METER = metrics.get_meter("kurrier")
_W3C = TraceContextTextMapPropagator()

JOBS_DESTINATION = "kurrier.job"
RESULTS_DESTINATION = "kurrier.result"


class TelemetryError(ValueError):
    """An OTEL_* or KURRIER_* telemetry variable has a value we cannot use."""


@dataclass
class TelemetryOptions:
    # True once an exporter is configured; spans are then recorded.
    tracing: bool = False
    # Mail addresses and SMTP reply texts in spans (they are personal data).
    trace_addresses: bool = False
    # Continue the trace named by a submitted message's Traceparent header.
    trust_traceparent_header: bool = False


options = TelemetryOptions()


def _flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "false", "0", "no", "off"):
        return False
    if value in ("true", "1", "yes", "on"):
        return True
    raise TelemetryError(f"{name}={os.environ[name]!r}: expected true or false")


def _exporter_names(variable: str, default: str) -> list[str]:
    names = [n.strip() for n in os.environ.get(variable, default).split(",") if n.strip()]
    return [] if "none" in names else names


def _protocol(signal: str) -> str:
    variable = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    if variable not in os.environ:
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = os.environ.get(variable, "grpc").strip() or "grpc"
    if protocol not in ("grpc", "http/protobuf"):
        raise TelemetryError(f"{variable}={protocol!r}: kurrier speaks grpc or http/protobuf")
    return protocol


def _span_exporters() -> list[SpanExporter]:
    # Exporting is opt-in: an endpoint, or an explicit OTEL_TRACES_EXPORTER,
    # switches it on; otherwise the SDK's localhost default would be dialled
    # by every pod of a cluster that has no collector.
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    endpoint_set = any(os.environ.get(variable) for variable in endpoints)
    if "OTEL_TRACES_EXPORTER" not in os.environ and not endpoint_set:
        return []
    exporters: list[SpanExporter] = []
    for name in _exporter_names("OTEL_TRACES_EXPORTER", "otlp"):
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name != "otlp":
            raise TelemetryError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}")
        elif _protocol("TRACES") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            exporters.append(GrpcSpanExporter())
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpSpanExporter,
            )

            exporters.append(HttpSpanExporter())
    return exporters


def _metric_readers(exporting: bool) -> list[MetricReader]:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    readers: list[MetricReader] = [PrometheusMetricReader(scope_info_enabled=False)]
    # The scrape endpoint is always there; pushing over OTLP too is opt-in.
    names = _exporter_names("OTEL_METRICS_EXPORTER", "prometheus") if exporting else []
    for name in names:
        if name == "prometheus":
            continue
        if name != "otlp":
            raise TelemetryError(f"OTEL_METRICS_EXPORTER: unknown exporter {name!r}")
        if _protocol("METRICS") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )

            readers.append(PeriodicExportingMetricReader(GrpcMetricExporter()))
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter as HttpMetricExporter,
            )

            readers.append(PeriodicExportingMetricReader(HttpMetricExporter()))
    return readers


def setup_telemetry(service_name: str) -> None:
    """Configure tracing, metrics and propagation for this process, once, from the environment.

    Raises TelemetryError for a variable it cannot honour, before anything is set.
    """
    options.trace_addresses = _flag("KURRIER_TRACE_ADDRESSES")
    options.trust_traceparent_header = _flag("KURRIER_TRUST_TRACEPARENT_HEADER")
    # Disabling the SDK stops everything it would send; the scrape endpoint,
    # which sends nothing, stays (probes and Prometheus rely on it).
    exporting = not _flag("OTEL_SDK_DISABLED")
    resource = Resource.create({SERVICE_NAME: service_name})
    exporters = _span_exporters() if exporting else []
    readers = _metric_readers(exporting)
    if exporters:
        tracer_provider = TracerProvider(resource=resource)
        for exporter in exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
        options.tracing = True
    # The SDK's MeterProvider would turn itself off under OTEL_SDK_DISABLED, and
    # the scrape endpoint with it; it reads the variable only while it is made.
    disabled = os.environ.pop("OTEL_SDK_DISABLED", None)
    try:
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    finally:
        if disabled is not None:
            os.environ["OTEL_SDK_DISABLED"] = disabled
    metrics.set_meter_provider(meter_provider)


def render_metrics() -> bytes:
    """The Prometheus text exposition of this process's metrics."""
    return prometheus_client.generate_latest(prometheus_client.REGISTRY)


# --- gRPC -------------------------------------------------------------------


def grpc_metadata() -> tuple[tuple[str, str], ...]:
    """The current trace context as gRPC call metadata (for the caller's side of a call)."""
    return tuple(inject_headers().items())


def grpc_server_interceptors(per_message_streams: Sequence[str] = ()) -> list[Any]:
    """Interceptors that start each call's span as a child of the caller's context.

    Health checks are left out: probes every few seconds would bury the mail.
    So are per_message_streams, long-lived calls carrying many messages: one
    span for the whole call would belong to no message's trace; their
    handlers open a span per message instead (serving_message).
    """
    if not options.tracing:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    skipped = filters.any_of(
        filters.health_check(), *(filters.method_name(name) for name in per_message_streams)
    )
    return [aio_server_interceptor(filter_=filters.negate(skipped))]  # type: ignore[no-untyped-call]


@contextmanager
def serving_message(rpc: str, trace_context: Mapping[str, str]) -> Iterator[Span]:
    """The server span of one message of a stream call, in the trace the message carries."""
    with TRACER.start_as_current_span(
        rpc,
        context=extract_context(trace_context),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.method": rpc.rsplit("/", 1)[-1]},
    ) as span:
        yield span


# --- propagation ------------------------------------------------------------


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """headers plus the current trace context (traceparent, tracestate), for a NATS publish."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The trace context carried by a consumed message's headers (empty if none)."""
    return propagate.extract(dict(headers or {}))


def current_traceparent() -> str:
    """The W3C traceparent of the current span, to keep in a message's record; '' if none."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent", "")


def _stored_context(traceparent: str) -> Context:
    return _W3C.extract({"traceparent": traceparent}) if traceparent else Context()


_HEADER_SCAN_LIMIT = 64 * 1024
_TRACE_HEADER = re.compile(
    rb"^(traceparent|tracestate):[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE
)


def submitted_context(content: bytes) -> Context | None:
    """The context named by a message's own Traceparent/Tracestate headers, if trusted and valid."""
    if not options.trust_traceparent_header:
        return None
    headers = content[:_HEADER_SCAN_LIMIT].split(b"\r\n\r\n", 1)[0]
    carrier = {
        name.decode().lower(): value.decode("ascii", errors="replace").strip()
        for name, value in _TRACE_HEADER.findall(headers)
    }
    if "traceparent" not in carrier:
        return None
    parent = _W3C.extract(carrier)
    return parent if trace.get_current_span(parent).get_span_context().is_valid else None


# --- spans ------------------------------------------------------------------


def annotate(queue_id: str, **attributes: str | int) -> None:
    """Name the message the current span (and every log line after this) is about."""
    current_queue_id.set(queue_id)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("kurrier.queue_id", queue_id)
        span.set_attributes({f"kurrier.{key}": value for key, value in attributes.items()})


def _reply_code(reply: str) -> tuple[int, str]:
    """(basic code, enhanced status code or '') of an SMTP reply text."""
    parts = reply.split(maxsplit=2)
    code = int(parts[0][:3]) if parts and parts[0][:3].isdigit() else 0
    enhanced = parts[1] if len(parts) > 1 and _ENHANCED.match(parts[1]) else ""
    return code, enhanced


_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def _set_reply(span: Span, reply: str) -> None:
    code, enhanced = _reply_code(reply)
    span.set_attribute("kurrier.smtp.reply_code", code)
    if enhanced:
        span.set_attribute("kurrier.smtp.enhanced_status", enhanced)
    if options.trace_addresses:
        span.set_attribute("kurrier.smtp.reply", reply)
    if code >= 400:
        span.set_status(Status(StatusCode.ERROR, f"{code} {enhanced}".strip()))


def _domains(addresses: Iterable[str]) -> list[str]:
    return sorted({domain_of(a) for a in addresses})


@dataclass
class Receipt:
    """The root span of one message at ingress, and the reply it ends with."""

    span: Span

    def replied(self, reply: str) -> str:
        """Record the final reply to DATA (and count the message); returns it unchanged."""
        _set_reply(self.span, reply)
        if reply.startswith("2"):
            MESSAGES_RECEIVED.add(1)
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
) -> Iterator[Receipt]:
    """The span of a message's receipt by ingress: the root of its trace."""
    attributes: dict[str, Any] = {
        "network.transport": "tcp",
        "network.protocol.name": "smtp",
        "kurrier.queue_id": queue_id,
        "kurrier.recipient.count": len(recipients),
        "kurrier.recipient.domains": _domains(recipients),
        "kurrier.message.size": size,
    }
    if message_id:
        attributes["kurrier.message_id"] = message_id
    if isinstance(peer, tuple) and len(peer) >= 2:
        attributes["client.address"] = str(peer[0])
        attributes["client.port"] = int(peer[1])
    if options.trace_addresses:
        attributes["kurrier.mail_from"] = mail_from
        attributes["kurrier.recipients"] = list(recipients)
    token = current_queue_id.set(queue_id)
    try:
        with TRACER.start_as_current_span(
            "SMTP DATA",
            context=submitted_context(content),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            yield Receipt(span)
    finally:
        current_queue_id.reset(token)


def _messaging(operation: str, destination: str, subject: str) -> dict[str, Any]:
    return {
        "messaging.system": "nats",
        "messaging.operation.type": operation,
        "messaging.destination.name": subject,
        "messaging.destination.template": f"{destination}.{{queue_id}}",
    }


@contextmanager
def publishing(
    destination: str,
    subject: str,
    headers: dict[str, str],
    *,
    queue_id: str,
    attempt: int,
    traceparent: str | None = None,
) -> Iterator[dict[str, str]]:
    """A producer span around one JetStream publish; yields headers carrying its context.

    traceparent, when given, is the message's stored context: the span joins
    that trace whatever is current (a retry runs from the queue's timer loop).
    """
    parent = _stored_context(traceparent) if traceparent is not None else None
    attributes = _messaging("send", destination, subject)
    attributes["kurrier.queue_id"] = queue_id
    attributes["kurrier.attempt"] = attempt
    if "Nats-Msg-Id" in headers:
        attributes["messaging.message.id"] = headers["Nats-Msg-Id"]
    with TRACER.start_as_current_span(
        f"send {destination}", context=parent, kind=SpanKind.PRODUCER, attributes=attributes
    ):
        yield inject_headers(headers)


@contextmanager
def consuming(destination: str, subject: str, headers: Mapping[str, str] | None) -> Iterator[Span]:
    """A consumer span for processing one JetStream message, in the publisher's trace."""
    queue_id = current_queue_id.set(None)
    try:
        with TRACER.start_as_current_span(
            f"process {destination}",
            context=extract_context(headers),
            kind=SpanKind.CONSUMER,
            attributes=_messaging("process", destination, subject),
        ) as span:
            yield span
    finally:
        current_queue_id.reset(queue_id)


async def traced_processing(
    destination: str, subject: str, headers: Mapping[str, str] | None, work: Awaitable[None]
) -> None:
    """Await work inside a consumer span (for work handed to its own task)."""
    with consuming(destination, subject, headers):
        await work


@contextmanager
def bouncing(record: MessageRecord, notice_queue_id: str) -> Iterator[None]:
    """The span of queueing a delivery status notification, in the failed message's trace.

    Its kurrier.queue_id is the notification's; the failed message's is
    kurrier.dsn.original_queue_id.
    """
    token = current_queue_id.set(notice_queue_id)
    try:
        with TRACER.start_as_current_span(
            "bounce",
            context=_stored_context(record.traceparent),
            attributes={
                "kurrier.queue_id": notice_queue_id,
                "kurrier.dsn.original_queue_id": record.queue_id,
            },
        ):
            yield
    finally:
        current_queue_id.reset(token)


@contextmanager
def publishing_table(table: RoutingTable) -> Iterator[Span]:
    """The span of publishing a compiled routing table (the operator's main act)."""
    with TRACER.start_as_current_span(
        "publish routing table",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": "kurrier-config",
            "kurrier.table.routes": len(table.routes),
            "kurrier.table.domains": len(table.domains),
        },
    ) as span:
        yield span


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
) -> list[RecipientOutcome]:
    """One SMTP transaction to the next hop of a route: its span, latency and outcomes."""
    route_name = route.name if route else ""
    attributes: dict[str, Any] = {
        "network.transport": "tcp",
        "network.protocol.name": "smtp",
        "kurrier.route": route_name,
        "kurrier.recipient.count": len(recipients),
        "kurrier.recipient.domains": _domains(recipients),
    }
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
            code, enhanced = _reply_code(outcome.reply)
            DELIVERY_ATTEMPTS.add(
                1,
                {
                    "route": route_name,
                    "domain": metric_domain(table, route, domain),
                    "outcome": outcome.outcome,
                    "status": enhanced or str(code),
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
            _set_reply(span, max((o.reply for o in outcomes), key=lambda r: _reply_code(r)[0]))
        return outcomes


# --- metrics ----------------------------------------------------------------

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


def rejected(reply: str) -> None:
    """Count a refusal (a 4xx or 5xx reply) by ingress, by its codes."""
    code, enhanced = _reply_code(reply)
    MESSAGES_REJECTED.add(1, {"code": str(code), "reason": enhanced or str(code)})


def count_recipient_changes(record: MessageRecord, before: Sequence[str], now: float) -> None:
    """Count the recipients whose status a stored change of record moved on.

    before holds each recipient's status as read, in record order; called
    once the change is stored, so a write retried after a conflict counts once.
    """
    for state, previous in zip(record.recipients, before, strict=True):
        if state.status == previous:
            continue
        if state.status == "deferred":
            RECIPIENTS_DEFERRED.add(1)
        elif state.status in FINAL_STATUSES:
            count_final(state.status, record.received_at, now)


def count_final(status: str, received_at: float, now: float) -> None:
    """Count a recipient that reached a final status (delivered, bounced, expired)."""
    if status == "delivered":
        RECIPIENTS_DELIVERED.add(1)
    else:
        reason = "expired" if status == "expired" else "rejected"
        RECIPIENTS_BOUNCED.add(1, {"reason": reason})
    TIME_IN_QUEUE.record(max(0.0, now - received_at), {"outcome": status})


class Gauge:
    """A gauge read at scrape time from a function the service supplies (absent until then)."""

    def __init__(self, name: str, unit: str, description: str) -> None:
        self._read: Callable[[], int] | None = None
        _METER.create_observable_gauge(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def follow(self, read: Callable[[], int]) -> None:
        self._read = read

    def _observe(self, _: CallbackOptions) -> Iterable[Observation]:
        return [] if self._read is None else [Observation(self._read())]


class StateGauge:
    """How many things are in each state, as last counted (absent until first counted)."""

    def __init__(self, name: str, unit: str, description: str, states: Sequence[str]) -> None:
        self._counts: Mapping[str, int] | None = None
        self._known = tuple(states)
        _METER.create_observable_gauge(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def update(self, counts: Mapping[str, int]) -> None:
        self._counts = counts

    def _observe(self, _: CallbackOptions) -> Iterable[Observation]:
        if self._counts is None:
            return []
        return [Observation(self._counts.get(s, 0), {"state": s}) for s in self._known]


SMTP_SESSIONS = Gauge("kurrier.smtp.sessions", "{session}", "SMTP sessions open at ingress")
QUEUE_DEPTH = StateGauge(
    "kurrier.queue.messages",
    "{message}",
    "Messages in the queue by state, counted from the message records when scraped",
    ("active", "deferred", "held"),
)
