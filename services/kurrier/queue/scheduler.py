"""The queue manager's loop: apply delivery results, re-dispatch deferred mail when due.

One heap of (due time, queue id) in memory, rebuilt from the KV records at
start, so retry timing survives restarts: the times themselves live in KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable

from kurrier.core.body_store import delete_body
from kurrier.core.jetstream import RESULTS_CONSUMER, RESULTS_STREAM
from kurrier.core.message import DeliveryResult, MessageRecord
from kurrier.core.table_store import TableFollower
from kurrier.queue.dispatch import mark_dispatched, publish_jobs
from kurrier.queue.records import RecordConflict, RecordStore
from kurrier.queue.retry_schedule import RetrySchedule
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import FetchTimeoutError

log = logging.getLogger(__name__)

# A change to a record: returns the recipients to dispatch now, or None if it changed nothing.
Mutation = Callable[[MessageRecord, float], list[str] | None]


class QueueManager:
    def __init__(
        self,
        js: JetStreamContext,
        records: RecordStore,
        tables: TableFollower,
        schedule: RetrySchedule,
    ) -> None:
        self._js = js
        self._records = records
        self._tables = tables
        self._schedule = schedule
        self._due: list[tuple[float, str]] = []
        self._wakeup = asyncio.Event()

    def watch(self, record: MessageRecord) -> None:
        """Remember when the record next needs attention."""
        pending = record.pending()
        if pending:
            heapq.heappush(self._due, (min(r.next_attempt for r in pending), record.queue_id))
            self._wakeup.set()

    async def load(self) -> int:
        count = 0
        async for record in self._records.all():
            self.watch(record)
            count += 1
        return count

    async def _mutate(self, queue_id: str, change: Mutation) -> MessageRecord | None:
        """Read-modify-write with optimistic concurrency; change returns recipients to dispatch."""
        while True:
            found = await self._records.get(queue_id)
            if found is None:
                return None
            record, revision = found
            now = time.time()
            to_dispatch = change(record, now)
            if to_dispatch is None:
                return record
            if not record.pending():
                # Record first: a crash in between leaves an orphan body, never a
                # live record whose body is gone.
                await self._records.delete(record.queue_id)
                await delete_body(self._js, record.queue_id, record.body_store)
                return record
            try:
                await self._records.update(record, revision)
            except RecordConflict:
                continue
            if to_dispatch:
                await publish_jobs(self._js, self._tables.table, record, to_dispatch)
            self.watch(record)
            return record

    def _apply_result(self, result: DeliveryResult) -> Mutation:
        def change(record: MessageRecord, now: float) -> list[str] | None:
            outcomes = {o.address: o for o in result.outcomes}
            for state in record.recipients:
                outcome = outcomes.get(state.address)
                if outcome is None or state.status in ("delivered", "bounced", "expired"):
                    continue
                state.last_reply = outcome.reply
                if outcome.outcome == "deferred":
                    state.status = "deferred"
                    state.next_attempt = now + self._schedule.delay(state.attempts)
                else:
                    state.status = outcome.outcome
                log.info(
                    "%s %s: %s",
                    state.address,
                    state.status,
                    outcome.reply,
                    extra={"queue_id": record.queue_id},
                )
            return []

        return change

    def _retry_due(self, record: MessageRecord, now: float) -> list[str] | None:
        due = [r for r in record.pending() if r.next_attempt <= now]
        if not due:
            return None
        if self._schedule.expired(record.received_at, now):
            for state in due:
                state.status = "expired"
                log.error(
                    "%s expired after %d attempts: %s",
                    state.address,
                    state.attempts,
                    state.last_reply,
                    extra={"queue_id": record.queue_id},
                )
            return []
        addresses = [r.address for r in due]
        mark_dispatched(record, addresses, now)
        return addresses

    async def run_results(self) -> None:
        """Consume delivery results; each is acked only once its record reflects it."""
        subscription = await self._js.pull_subscribe(
            "kurrier.result.*",
            durable=RESULTS_CONSUMER,
            stream=RESULTS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_deliver=-1),
        )
        while True:
            try:
                messages = await subscription.fetch(batch=64, timeout=5)
            except (FetchTimeoutError, TimeoutError):
                continue
            for message in messages:
                try:
                    result = DeliveryResult.model_validate_json(message.data)
                except ValueError as error:
                    log.error("dropping an unreadable delivery result: %s", error)
                    await message.term()
                    continue
                await self._mutate(result.queue_id, self._apply_result(result))
                await message.ack()

    async def run_retries(self) -> None:
        while True:
            now = time.time()
            while self._due and self._due[0][0] <= now:
                _, queue_id = heapq.heappop(self._due)
                await self._mutate(queue_id, self._retry_due)
            self._wakeup.clear()
            timeout = self._due[0][0] - now if self._due else 60.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.05, timeout))
