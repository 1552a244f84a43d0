"""A message's history: its events, buffered per process and published in batches.

Every service records what happens to a message (received, queued, each
delivery attempt, deferred, bounced, delivered, held, deleted ...) with
`HISTORY.record`, which only appends to a bounded buffer in memory and
never waits: mail handling neither blocks nor fails because NATS is slow or
away. `HISTORY.run` publishes the buffer to KURRIER_HISTORY as one stream
message per batch (every FLUSH_INTERVAL, or sooner once BATCH_EVENTS wait),
on a subject of its own per process; on a single node each stored message is
one fsync, so a batch costs one synced write whatever the number of
messages in it. A batch NATS did not take stays buffered for the next try;
events that find the buffer full are dropped, counted in
`kurrier_history_events_dropped_total` and logged. History is best-effort:
the queue's records are the source of truth.

Bodies are never recorded; addresses and SMTP replies are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import time
from collections import deque

from kurrier.core.jetstream import history_subjects
from kurrier.core.metrics import HISTORY_EVENTS_DROPPED
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.5
BATCH_EVENTS = 500
# Well under NATS's default max_payload of 1 MiB.
BATCH_BYTES = 512 * 1024
BUFFER_EVENTS = 20_000
PUBLISH_TIMEOUT = 2.0


class HistoryEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    at: float
    queue_id: str
    service: str
    event: str
    trace_id: str = ""
    details: dict[str, str] = {}


def history_subject(service: str) -> str:
    """One subject per process: the pod's name (or the host's) and the pid."""
    process = re.sub(r"[^A-Za-z0-9_-]", "_", f"{socket.gethostname()}-{os.getpid()}")
    return history_subjects(service).replace("*", process)


def trace_id_of(traceparent: str) -> str:
    """The trace id of a W3C traceparent (version-traceid-spanid-flags), or ''."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 else ""


def _current_trace_id() -> str:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def decode_batch(data: bytes) -> list[HistoryEvent]:
    """A batch as stored: one JSON document per event, a line each."""
    return [HistoryEvent.model_validate_json(line) for line in data.splitlines() if line]


class History:
    """This process's buffer of events and the task that publishes it."""

    def __init__(self, capacity: int = BUFFER_EVENTS) -> None:
        self.service = ""
        self._capacity = capacity
        # Each event as it is published: one JSON line.
        self._buffer: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._dropped = 0
        self._failing = False

    def record(
        self,
        queue_id: str,
        event: str,
        *,
        trace_id: str | None = None,
        at: float | None = None,
        **details: object,
    ) -> None:
        """Buffer one event (never waits); trace_id defaults to the current span's."""
        if len(self._buffer) >= self._capacity:
            self._dropped += 1
            HISTORY_EVENTS_DROPPED.add(1)
            return
        entry = HistoryEvent(
            at=time.time() if at is None else at,
            queue_id=queue_id,
            service=self.service,
            event=event,
            trace_id=_current_trace_id() if trace_id is None else trace_id,
            details={key: str(value) for key, value in details.items() if value not in ("", None)},
        )
        self._buffer.append(entry.model_dump_json().encode() + b"\n")
        if len(self._buffer) >= BATCH_EVENTS:
            self._ready.set()

    async def run(self, js: JetStreamContext, service: str) -> None:
        """Publish the buffer until cancelled; what is buffered then is published once more."""
        self.service = service
        subject = history_subject(service)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FLUSH_INTERVAL):
                        await self._ready.wait()
                self._ready.clear()
                await self.flush(js, subject)
        finally:
            await asyncio.shield(self.flush(js, subject))

    async def flush(self, js: JetStreamContext, subject: str) -> None:
        """Publish what is buffered, a batch at a time; stop at the first failure."""
        self._report_dropped()
        while self._buffer:
            batch: list[bytes] = []
            size = 0
            for line in self._buffer:
                if batch and (len(batch) >= BATCH_EVENTS or size + len(line) > BATCH_BYTES):
                    break
                batch.append(line)
                size += len(line)
            try:
                await js.publish(subject, b"".join(batch), timeout=PUBLISH_TIMEOUT)
            except (NatsError, TimeoutError) as error:
                if not self._failing:
                    log.warning("history: publishing failed, keeping the events: %r", error)
                self._failing = True
                return
            if self._failing:
                log.info("history: publishing again")
            self._failing = False
            for _ in batch:
                self._buffer.popleft()

    def _report_dropped(self) -> None:
        if self._dropped:
            log.warning("history: %d event(s) dropped, the buffer was full", self._dropped)
            self._dropped = 0


# The one buffer of this process: the services record into it, serve() runs it.
HISTORY = History()
