"""Logging for every service: JSON lines when not on a terminal, plain text on one."""

from __future__ import annotations

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


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    else:
        handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO, addresses included; that is our job, not its.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
