"""Logging for every service: JSON lines when not on a terminal, plain text on one."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace

# Attributes that `logger.info(..., extra={...})` may add and that belong in the record.
_EXTRA_FIELDS = ("queue_id", "trace_id", "span_id", "recipient", "reply", "route")

# The message the running task works on (set by kurrier.core.telemetry), so
# every line about it names it, whichever module logs the line.
current_queue_id: ContextVar[str | None] = ContextVar("current_queue_id", default=None)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            document["trace_id"] = format(span.trace_id, "032x")
            document["span_id"] = format(span.span_id, "016x")
        queue_id = current_queue_id.get()
        if queue_id is not None:
            document["queue_id"] = queue_id
        for field in _EXTRA_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                document[field] = value
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


class TurnBufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines logged in one turn of the event loop go out in one write, early in the next.

    The queue logs about two lines per message; written one by one, each line
    was a system call of its own. A line waits at most one turn of the loop.
    Warnings and errors, lines from threads without a running loop, and
    whatever is pending at exit (logging.shutdown flushes) are written at once.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or record.levelno >= logging.WARNING:
            self._write_pending()
            super().emit(record)
            return
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        if len(self._pending) == 1:
            loop.call_soon(self.flush)

    def _write_pending(self) -> None:
        if self._pending:
            lines = "".join(self._pending)
            self._pending.clear()
            self.stream.write(lines)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()
            super().flush()


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = TurnBufferedHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    else:
        handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO, addresses included; that is our job, not its.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
