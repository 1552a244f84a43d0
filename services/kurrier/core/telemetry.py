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

Here: the SDK's setup and the propagation every service shares (gRPC,
JetStream, a message's stored traceparent). The metrics are defined in
kurrier.core.metrics; each service's own spans in its spans module.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import prometheus_client
from kurrier.core.logs import current_queue_id

# Defined in kurrier.core.metrics; kurrier.queue.main and kurrier.ingress.main import them here.
from kurrier.core.metrics import QUEUE_DEPTH as QUEUE_DEPTH
from kurrier.core.metrics import SMTP_SESSIONS as SMTP_SESSIONS
from kurrier.core.smtp_text import enhanced_status, header_section, reply_code
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
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
_W3C = TraceContextTextMapPropagator()

JOBS_DESTINATION = "kurrier.dispatch"
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


def stored_context(traceparent: str) -> Context:
    """The context of a traceparent kept in a message's record (empty if '')."""
    return _W3C.extract({"traceparent": traceparent}) if traceparent else Context()


_TRACE_HEADER = re.compile(
    rb"^(traceparent|tracestate):[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE
)


def submitted_context(content: bytes) -> Context | None:
    """The context named by a message's own Traceparent/Tracestate headers, if trusted and valid."""
    if not options.trust_traceparent_header:
        return None
    carrier = {
        name.decode().lower(): value.decode("ascii", errors="replace").strip()
        for name, value in _TRACE_HEADER.findall(header_section(content))
    }
    if "traceparent" not in carrier:
        return None
    parent = _W3C.extract(carrier)
    return parent if trace.get_current_span(parent).get_span_context().is_valid else None


# --- JetStream --------------------------------------------------------------


def _messaging(operation: str, subject: str) -> dict[str, Any]:
    # The span's name says what travels (kurrier.result), the subject where:
    # results go to one of two streams (core/jetstream.py).
    return {
        "messaging.system": "nats",
        "messaging.operation.type": operation,
        "messaging.destination.name": subject,
        "messaging.destination.template": subject.rsplit(".", 1)[0] + ".{queue_id}",
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
    parent = stored_context(traceparent) if traceparent is not None else None
    attributes = _messaging("send", subject)
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
    with (
        working_on(None),
        TRACER.start_as_current_span(
            f"process {destination}",
            context=extract_context(headers),
            kind=SpanKind.CONSUMER,
            attributes=_messaging("process", subject),
        ) as span,
    ):
        yield span


async def traced_processing(
    destination: str, subject: str, headers: Mapping[str, str] | None, work: Awaitable[None]
) -> None:
    """Await work inside a consumer span (for work handed to its own task)."""
    with consuming(destination, subject, headers):
        await work


# --- what the services' spans share -----------------------------------------
# Each service's own spans are in its spans module: kurrier.ingress.spans,
# kurrier.queue.spans, kurrier.delivery.spans; the routing table's publish
# span is in kurrier.core.table_store.


@contextmanager
def working_on(queue_id: str | None) -> Iterator[None]:
    """Every log line in the block names queue_id (None: no message, until annotate names one)."""
    token = current_queue_id.set(queue_id)
    try:
        yield
    finally:
        current_queue_id.reset(token)


def annotate(queue_id: str, **attributes: str | int) -> None:
    """Name the message the current span (and every log line after this) is about."""
    current_queue_id.set(queue_id)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("kurrier.queue_id", queue_id)
        span.set_attributes({f"kurrier.{key}": value for key, value in attributes.items()})


def smtp_attributes(recipient_domains: Iterable[str], recipients: int) -> dict[str, Any]:
    """The attributes of a span of one SMTP transaction (ingress's receipt, delivery's send)."""
    return {
        "network.transport": "tcp",
        "network.protocol.name": "smtp",
        "kurrier.recipient.count": recipients,
        "kurrier.recipient.domains": sorted(set(recipient_domains)),
    }


def set_reply(span: Span, reply: str) -> None:
    """Record the SMTP reply a span ends with: its codes, and an error status for 4xx/5xx."""
    code, enhanced = reply_code(reply), enhanced_status(reply)
    span.set_attribute("kurrier.smtp.reply_code", code)
    if enhanced:
        span.set_attribute("kurrier.smtp.enhanced_status", enhanced)
    if options.trace_addresses:
        span.set_attribute("kurrier.smtp.reply", reply)
    if code >= 400:
        span.set_status(Status(StatusCode.ERROR, f"{code} {enhanced}".strip()))
