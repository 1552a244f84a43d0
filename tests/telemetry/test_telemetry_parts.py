"""The small parts of telemetry: configuration errors, header continuation, labels, /metrics."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from kurrier.core import http_endpoint, telemetry
from kurrier.core.http_endpoint import HttpEndpoint
from kurrier.core.routing import CompiledDomain, CompiledRoute, RoutingTable
from kurrier.delivery.spans import metric_domain
from opentelemetry import trace

from tests.support.processes import free_port, kurrier_argv


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "grpc or http/protobuf"),
        ("OTEL_TRACES_EXPORTER", "zipkin", "unknown exporter 'zipkin'"),
        ("OTEL_METRICS_EXPORTER", "statsd", "unknown exporter 'statsd'"),
        ("KURRIER_TRACE_ADDRESSES", "perhaps", "expected true or false"),
    ],
)
def test_a_bad_telemetry_variable_stops_the_service_with_a_clear_error(
    variable: str, value: str, complaint: str
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1", variable: value}
    done = subprocess.run(
        kurrier_argv("delivery", "--nats-url", "nats://127.0.0.1:1", "--metrics-listen", "off"),
        env={**_base_env(), **env},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert complaint in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "KURRIER_"))}


@pytest.fixture
def trusting_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry.options, "trust_traceparent_header", True)


def _span_of(content: bytes) -> trace.SpanContext | None:
    parent = telemetry.submitted_context(content)
    return None if parent is None else trace.get_current_span(parent).get_span_context()


@pytest.mark.usefixtures("trusting_headers")
def test_a_trusted_traceparent_header_is_read_from_the_header_section_only() -> None:
    header = b"TraceParent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"
    found = _span_of(b"Subject: x\r\n" + header + b"\r\nbody\r\n")
    assert found is not None
    assert (found.trace_id, found.span_id) == (0x4BF92F3577B34DA6A3CE929D0E0E4736, 0xF067AA0BA902B7)
    assert _span_of(b"Subject: x\r\n\r\n" + header) is None  # in the body: not a header
    assert (
        _span_of(b"traceparent: 00-00000000000000000000000000000000-00f067aa0ba902b7-01\r\n\r\n")
        is None
    )
    assert _span_of(b"traceparent: nonsense\r\n\r\n") is None


def test_a_traceparent_header_is_ignored_unless_trusted() -> None:
    header = b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n"
    assert not telemetry.options.trust_traceparent_header
    assert telemetry.submitted_context(header) is None


def test_metric_domains_are_only_those_the_configuration_names() -> None:
    route = CompiledRoute(name="r", priority=1, recipient_domains=("example.com", "*.example.org"))
    table = RoutingTable(
        routes=(route,), domains=(CompiledDomain(domain="inbound.test", accept_inbound=True),)
    )
    assert metric_domain(table, route, "example.com") == "example.com"
    assert metric_domain(table, None, "inbound.test") == "inbound.test"
    assert metric_domain(table, route, "a.example.org") == "other"
    assert metric_domain(table, None, "gmail.test") == "other"


def test_an_expensive_metrics_refresh_runs_at_most_once_a_second_and_may_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def get_metrics(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await reader.read()
        writer.close()
        return response

    async def scenario() -> list[bytes]:
        calls: list[int] = []

        async def refresh() -> None:
            calls.append(1)
            if len(calls) > 1:
                raise ConnectionError("NATS is away")

        endpoint = HttpEndpoint(lambda: True, lambda: f"calls {len(calls)}\n".encode(), refresh)
        port = free_port()
        server = await endpoint.serve(f"127.0.0.1:{port}")
        bodies = [await get_metrics(port) for _ in range(3)]
        monkeypatch.setattr(http_endpoint, "REFRESH_INTERVAL", 0.0)  # the second has passed
        bodies.append(await get_metrics(port))
        server.close()
        return bodies

    bodies = asyncio.run(scenario())
    assert [b.split(b"\r\n\r\n", 1)[1] for b in bodies] == [b"calls 1\n"] * 3 + [b"calls 2\n"]
    assert all(b.startswith(b"HTTP/1.1 200 OK") for b in bodies)
