"""A real Jaeger (v2, built by scripts/testbin.sh) as the OTLP endpoint, read through its
query API, the one the Jaeger UI uses."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import kube
from tests.support.processes import free_port, stop_process, wait_until

# In-memory storage, OTLP over gRPC in, the query API out; every port the test's own.
CONFIG = """
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces: {{receivers: [otlp], processors: [batch], exporters: [jaeger_storage_exporter]}}
  telemetry:
    metrics: {{level: none}}
    logs: {{level: warn}}
extensions:
  jaeger_storage:
    backends: {{memstore: {{memory: {{max_traces: 10000}}}}}}
  jaeger_query:
    storage: {{traces: memstore}}
    enable_tracing: false  # its own spans, which it would send to localhost:4317
    http: {{endpoint: "127.0.0.1:{query}"}}
    grpc: {{endpoint: "127.0.0.1:{query_grpc}"}}
receivers:
  otlp:
    protocols: {{grpc: {{endpoint: "127.0.0.1:{otlp}"}}}}
processors:
  batch: {{timeout: 100ms}}
exporters:
  jaeger_storage_exporter: {{trace_storage: memstore}}
"""


@dataclass(frozen=True)
class JaegerSpan:
    name: str
    service: str
    trace_id: str
    span_id: str
    parent_id: str | None
    start: float  # Unix time, seconds
    tags: dict[str, Any]
    # Its events: (Unix time, seconds; the event's fields, "event" its name).
    events: list[tuple[float, dict[str, Any]]]


class Jaeger:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.otlp_port, self.query_port = free_port(), free_port()
        self._query_grpc_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Jaeger:
        config = self.workdir / "jaeger.yaml"
        config.write_text(
            CONFIG.format(
                otlp=self.otlp_port, query=self.query_port, query_grpc=self._query_grpc_port
            )
        )
        log = (self.workdir / "jaeger.log").open("ab")
        self._process = subprocess.Popen(
            [str(kube.testbin_dir() / "jaeger"), "--config", f"file:{config}"],
            stdout=log,
            stderr=log,
        )
        wait_until(self._answers, 30, "Jaeger's query API")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        stop_process(self._process)

    def env(self) -> dict[str, str]:
        """What a service needs to export here, with a short batch delay for fast tests."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.otlp_port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    def _get(self, path: str, **query: str) -> Any:
        url = f"http://127.0.0.1:{self.query_port}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)

    def _answers(self) -> bool:
        try:
            self._get("/api/services")
        except OSError:
            return False
        return True

    def traces(self, service: str, **tags: str) -> list[list[JaegerSpan]]:
        """The traces with a span of service carrying these tags, as the UI's search finds them."""
        found = self._get(
            "/api/traces", service=service, tags=json.dumps(tags), lookback="1h", limit="20"
        )
        return [_spans(trace) for trace in found["data"]]


def _spans(trace: dict[str, Any]) -> list[JaegerSpan]:
    services = {key: process["serviceName"] for key, process in trace["processes"].items()}
    spans = []
    for span in trace["spans"]:
        parents = [r["spanID"] for r in span["references"] if r["refType"] == "CHILD_OF"]
        spans.append(
            JaegerSpan(
                name=span["operationName"],
                service=services[span["processID"]],
                trace_id=span["traceID"],
                span_id=span["spanID"],
                parent_id=parents[0] if parents else None,
                # Jaeger's times are microseconds.
                start=span["startTime"] / 1e6,
                tags={tag["key"]: tag["value"] for tag in span["tags"]},
                events=[
                    (log["timestamp"] / 1e6, {f["key"]: f["value"] for f in log["fields"]})
                    for log in span["logs"]
                ],
            )
        )
    return spans
