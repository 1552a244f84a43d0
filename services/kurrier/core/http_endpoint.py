"""The small HTTP endpoint every service serves: /healthz for probes, /metrics for Prometheus,
and the JSON documents a service adds (delivery's /tlsrpt).

Plain asyncio, no framework: two GET routes do not justify a web stack in
every container.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from kurrier.core.addresses import parse_host_port
from kurrier.core.telemetry import render_metrics

log = logging.getLogger(__name__)

DEFAULT_METRICS_LISTEN = "0.0.0.0:9090"
_MAX_REQUEST_HEAD = 8192

HealthCheck = Callable[[], bool]
MetricsRenderer = Callable[[], bytes]
Refresh = Callable[[], Awaitable[None]]
# A JSON document, made from the request's query string; ValueError for a bad query.
Document = Callable[[str], bytes]
# However often /metrics is asked, an expensive refresh runs at most this often.
REFRESH_INTERVAL = 1.0
REFRESH_TIMEOUT = 5.0


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _path(request_line: bytes) -> bytes:
    parts = request_line.split()
    return parts[1].split(b"?", 1)[0] if len(parts) == 3 else b""


def _query(request_line: bytes) -> str:
    parts = request_line.split()
    return parts[1].partition(b"?")[2].decode("ascii", "replace") if len(parts) == 3 else ""


class HttpEndpoint:
    """refresh, when given, brings gauges counted on demand up to date before /metrics."""

    def __init__(
        self,
        healthy: HealthCheck,
        metrics: MetricsRenderer | None = render_metrics,
        refresh: Refresh | None = None,
        documents: Mapping[str, Document] | None = None,
    ) -> None:
        self._healthy = healthy
        self._metrics = metrics
        self._refresh = refresh
        self._documents = {path.encode(): make for path, make in (documents or {}).items()}
        self._refreshed_at = float("-inf")

    def respond(self, request_line: bytes) -> bytes:
        parts = request_line.split()
        if len(parts) != 3 or parts[0] != b"GET":
            return _response("405 Method Not Allowed", "text/plain", b"GET only\n")
        path = _path(request_line)
        if path == b"/healthz":
            if self._healthy():
                return _response("200 OK", "text/plain", b"ok\n")
            return _response("503 Service Unavailable", "text/plain", b"unhealthy\n")
        if path == b"/metrics" and self._metrics is not None:
            return _response("200 OK", "text/plain; version=0.0.4", self._metrics())
        if path in self._documents:
            try:
                document = self._documents[path](_query(request_line))
            except ValueError as error:
                return _response("400 Bad Request", "text/plain", f"{error}\n".encode())
            return _response("200 OK", "application/json", document)
        return _response("404 Not Found", "text/plain", b"not found\n")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            request_line = head[:_MAX_REQUEST_HEAD].split(b"\r\n", 1)[0]
            if _path(request_line) == b"/metrics":
                await self._refresh_metrics()
            writer.write(self.respond(request_line))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def _refresh_metrics(self) -> None:
        now = time.monotonic()
        if self._refresh is None or now - self._refreshed_at < REFRESH_INTERVAL:
            return
        self._refreshed_at = now
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT):
                await self._refresh()
        except Exception:
            # A scrape must not fail because, say, NATS is away: the last values stand.
            log.warning("metrics refresh failed; serving the last values", exc_info=True)

    async def serve(self, listen: str) -> asyncio.Server:
        host, port = parse_host_port(listen)
        server = await asyncio.start_server(self._handle, host, port, limit=_MAX_REQUEST_HEAD)
        log.info("health and metrics on http://%s/healthz", listen)
        return server
