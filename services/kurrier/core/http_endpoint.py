"""The small HTTP endpoint every service serves: /healthz for probes, /metrics for Prometheus.

Plain asyncio, no framework: two GET routes do not justify a web stack in
every container.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kurrier.core.addresses import parse_host_port

log = logging.getLogger(__name__)

DEFAULT_METRICS_LISTEN = "0.0.0.0:9090"
_MAX_REQUEST_HEAD = 8192

HealthCheck = Callable[[], bool]
MetricsRenderer = Callable[[], bytes]


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class HttpEndpoint:
    def __init__(self, healthy: HealthCheck, metrics: MetricsRenderer | None = None) -> None:
        self._healthy = healthy
        self._metrics = metrics

    def respond(self, request_line: bytes) -> bytes:
        parts = request_line.split()
        if len(parts) != 3 or parts[0] != b"GET":
            return _response("405 Method Not Allowed", "text/plain", b"GET only\n")
        path = parts[1].split(b"?", 1)[0]
        if path == b"/healthz":
            if self._healthy():
                return _response("200 OK", "text/plain", b"ok\n")
            return _response("503 Service Unavailable", "text/plain", b"unhealthy\n")
        if path == b"/metrics" and self._metrics is not None:
            return _response("200 OK", "text/plain; version=0.0.4", self._metrics())
        return _response("404 Not Found", "text/plain", b"not found\n")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            writer.write(self.respond(head[:_MAX_REQUEST_HEAD].split(b"\r\n", 1)[0]))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def serve(self, listen: str) -> asyncio.Server:
        host, port = parse_host_port(listen)
        server = await asyncio.start_server(self._handle, host, port, limit=_MAX_REQUEST_HEAD)
        log.info("health and metrics on http://%s/healthz", listen)
        return server
