"""The queue manager: apply delivery results, re-dispatch deferred mail when due, bounce
what failed, and carry out admin actions.

Retry times are JetStream message schedules (one per deferred message, on
kurrier.schedule.<id>), so they survive restarts and fire into kurrier.due.*
for whichever queue process is alive. The sweeper (sweeper.py) repairs what
a crash leaves behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
import logging
import time
from collections.abc import Awaitable, Callable

from kurrier.core.body_store import delete_body, load_body
from kurrier.core.jetstream import (
    DUE_CONSUMER,
    JOBS_STREAM,
    RESULTS_CONSUMER,
    RESULTS_STREAM,
    due_subject,
    pull_batch,
    schedule_subject,
)
from kurrier.core.message import (
    FAILED_STATUSES,
    DeliveryResult,
    MessageRecord,
    RecipientState,
)
from kurrier.core.record_removal import RecordChanged
from kurrier.core.table_store import TableFollower
from kurrier.core.telemetry import (
    RESULTS_DESTINATION,
    annotate,
    bouncing,
    consuming,
    count_recipient_changes,
)
from kurrier.queue.dispatch import mark_dispatched, publish_jobs
from kurrier.queue.dsn import render_dsn
from kurrier.queue.intake import Intake
from kurrier.queue.records import RecordStore
from kurrier.queue.retry_schedule import RetrySchedule
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

log = logging.getLogger(__name__)

# A change to a record: returns the recipients to dispatch now, or None if it
# changed nothing (then nothing is written).
Mutation = Callable[[MessageRecord, float], list[str] | None]


class QueueManager:
    def __init__(
        self,
        js: JetStreamContext,
        records: RecordStore,
        tables: TableFollower,
        schedule: RetrySchedule,
        hostname: str,
    ) -> None:
        self._js = js
        self._records = records
        self._tables = tables
        self._schedule = schedule
        self._hostname = hostname
        self.intake = Intake(js, records, tables)

    @property
    def records(self) -> RecordStore:
        return self._records

    async def _schedule_next(self, record: MessageRecord) -> None:
        """Arrange for the queue to look at the record again when its next retry is due."""
        deferred = [r.next_attempt for r in record.pending() if r.status == "deferred"]
        if record.held or not deferred:
            if record.scheduled:
                await self._js.purge_stream(JOBS_STREAM, subject=schedule_subject(record.queue_id))
            return
        due = min(deferred)
        if due <= time.time():
            await self._js.publish(due_subject(record.queue_id), b"", stream=JOBS_STREAM)
            return
        # Whole seconds, rounded up: the schedule must never fire before the time.
        at = datetime.datetime.fromtimestamp(int(due) + 1, tz=datetime.UTC)
        await self._js.publish(
            schedule_subject(record.queue_id),
            b"",
            stream=JOBS_STREAM,
            headers={
                "Nats-Schedule": f"@at {at.strftime('%Y-%m-%dT%H:%M:%SZ')}",
                "Nats-Schedule-Target": due_subject(record.queue_id),
            },
        )

    async def mutate(
        self, queue_id: str, change: Mutation, fresh: bool = False
    ) -> MessageRecord | None:
        """Read-modify-write with optimistic concurrency; None if there is no such message.

        fresh skips this process's copy of the record: admin actions must see
        what any other queue process did, a result or a due retry need not (a
        stale copy fails the update and is read again).

        A change that finds nothing to do is believed only of the record as the
        stream's leader holds it. This process's copy, or a lagging replica's,
        may predate what another queue process wrote since (a deferral, say):
        a due retry checked against it finds nothing due, is acknowledged, and
        the retry is gone. Reading at the leader costs a round trip, but only
        on that path, which the usual message never takes.
        """
        confirming = False
        while True:
            found = await self._records.get(queue_id, fresh=fresh, at_leader=confirming)
            if found is None:
                return None
            record, revision = found
            before = [r.status for r in record.recipients]
            failed_before = {r.address for r in record.recipients if r.status in FAILED_STATUSES}
            now = time.time()
            to_dispatch = change(record, now)
            if to_dispatch is None:
                if confirming:
                    return record
                confirming = True
                continue
            newly_failed = [
                r
                for r in record.recipients
                if r.status in FAILED_STATUSES and r.address not in failed_before
            ]
            if newly_failed:
                # The notification is stored before the record moves on, so a
                # crash in between re-applies the change and finds it stored.
                await self._notify_sender(record, newly_failed, now)
            if not record.pending():
                # Record first: a crash in between leaves an orphan body, never a
                # live record whose body is gone.
                try:
                    await self._records.delete(record.queue_id, revision)
                except RecordChanged:
                    fresh = True
                    continue
                await delete_body(self._js, record.queue_id, record.body_store)
                if record.scheduled:
                    await self._js.purge_stream(
                        JOBS_STREAM, subject=schedule_subject(record.queue_id)
                    )
                count_recipient_changes(record, before, now)
                return record
            record.scheduled = any(r.status == "deferred" for r in record.pending())
            try:
                revision = await self._records.update(record, revision)
            except RecordChanged:
                fresh = True
                continue
            count_recipient_changes(record, before, now)
            if to_dispatch:
                await publish_jobs(self._js, self._tables.table, record, to_dispatch, revision)
            await self._schedule_next(record)
            return record

    async def delete(self, queue_id: str) -> bool:
        found = await self._records.get(queue_id, fresh=True)
        if found is None:
            return False
        await self._records.delete(queue_id)
        await delete_body(self._js, queue_id, found[0].body_store)
        log.info("deleted by the administrator", extra={"queue_id": queue_id})
        return True

    async def _notify_sender(
        self, record: MessageRecord, failed: list[RecipientState], now: float
    ) -> None:
        if not record.mail_from:
            # RFC 5321 6.1: never bounce a bounce; log it and let it go.
            for recipient in failed:
                log.warning(
                    "undeliverable notification to %s dropped: %s",
                    recipient.address,
                    recipient.last_reply,
                    extra={"queue_id": record.queue_id},
                )
            return
        original = await load_body(self._js, record.queue_id, record.body_store)
        notice = render_dsn(record, failed, original, self._hostname, now)
        record.notices += 1
        template = MessageRecord(
            queue_id=notice.queue_id,
            mail_from="",
            recipients=[RecipientState(address=notice.recipient)],
            received_at=now,
            size=len(notice.content),
            body_store="stream",
            smtputf8=not notice.recipient.isascii(),
            body_type="8BITMIME",
            message_id_header=f"<{notice.queue_id}@{self._hostname}>",
        )
        with bouncing(record, notice.queue_id):
            await self.intake.accept(template, io.BytesIO(notice.content), len(notice.content))
        log.info(
            "sender notified of %d failed recipient(s) in %s",
            len(failed),
            notice.queue_id,
            extra={"queue_id": record.queue_id},
        )

    def _apply_result(self, result: DeliveryResult) -> Mutation:
        def change(record: MessageRecord, now: float) -> list[str] | None:
            outcomes = {o.address: o for o in result.outcomes}
            changed = False
            for state in record.pending():
                outcome = outcomes.get(state.address)
                if outcome is None:
                    continue
                changed = True
                state.record_attempt(now, outcome.reply)
                if outcome.outcome != "deferred":
                    state.status = outcome.outcome
                elif self._schedule.expired(record.received_at, now):
                    state.status = "expired"
                else:
                    state.status = "deferred"
                    state.next_attempt = now + self._schedule.delay(state.attempts)
                log.info(
                    "to=<%s> status=%s attempts=%d reply=%s",
                    state.address,
                    state.status,
                    state.attempts,
                    outcome.reply,
                    extra={"queue_id": record.queue_id},
                )
            return [] if changed else None

        return change

    def retry_due(self, record: MessageRecord, now: float) -> list[str] | None:
        if record.held:
            return None
        due = [r for r in record.pending() if r.next_attempt <= now]
        if not due:
            return None
        if self._schedule.expired(record.received_at, now):
            for state in due:
                state.status = "expired"
            return []
        addresses = [r.address for r in due]
        mark_dispatched(record, addresses, now)
        return addresses

    @staticmethod
    def hold(record: MessageRecord, now: float) -> list[str] | None:
        if record.held:
            return None
        record.held = True
        return []

    @staticmethod
    def release(record: MessageRecord, now: float) -> list[str] | None:
        if not record.held:
            return None
        record.held = False
        for state in record.pending():
            state.next_attempt = min(state.next_attempt, now)
        return []

    @staticmethod
    def retry_now(record: MessageRecord, now: float) -> list[str] | None:
        deferred = [r for r in record.pending() if r.status == "deferred"]
        if record.held or not deferred:
            return None
        for state in deferred:
            state.next_attempt = now
        return []

    async def _consume(
        self, subject: str, durable: str, stream: str, handle: Callable[[Msg], Awaitable[None]]
    ) -> None:
        subscription = await self._js.pull_subscribe(
            subject,
            durable=durable,
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_deliver=-1),
        )
        while True:
            batch = await pull_batch(subscription, batch=64, timeout=5)
            # Messages about different queue ids are independent, so a batch is
            # handled concurrently: their JetStream writes and acks then share
            # round trips instead of queueing behind each other. Messages about
            # one queue id keep their order.
            by_queue_id: dict[str, list[Msg]] = {}
            for message in batch:
                by_queue_id.setdefault(message.subject.rsplit(".", 1)[-1], []).append(message)
            await asyncio.gather(*(self._in_order(handle, group) for group in by_queue_id.values()))

    @staticmethod
    async def _in_order(handle: Callable[[Msg], Awaitable[None]], messages: list[Msg]) -> None:
        for message in messages:
            await handle(message)

    async def _settle(
        self,
        message: Msg,
        queue_id: str,
        change: Mutation,
        come_back: Callable[[MessageRecord, float], float | None] | None = None,
    ) -> None:
        """Apply change and ack; on failure (e.g. NATS away or full) let it come back later.

        come_back, given the record as it now is, says in how many seconds the
        message should be delivered again instead of acknowledged (None: ack).
        """
        try:
            record = await self.mutate(queue_id, change)
        except Exception:
            log.exception("could not update the record; will retry", extra={"queue_id": queue_id})
            with contextlib.suppress(Exception):
                await message.nak(delay=5)
            return
        delay = come_back(record, time.time()) if come_back and record else None
        if delay is not None:
            await message.nak(delay=delay)
        else:
            await message.ack()

    @staticmethod
    def early_by(record: MessageRecord, now: float) -> float | None:
        """How early a due retry that found nothing to dispatch came, or None if it was not.

        A schedule fires by the NATS server's clock, which may run ahead of
        this process's: the due then finds its recipient not yet due, while the
        schedule is spent. Such a due comes back when the recipient is due. A
        held message (release sends a due), a job in flight (its result
        schedules what remains) or a finished message need no due.
        """
        pending = record.pending()
        if record.held or any(r.status == "queued" for r in pending):
            return None
        waiting = [r.next_attempt - now for r in pending if r.status == "deferred"]
        return max(0.0, min(waiting)) if waiting else None

    async def _on_result(self, message: Msg) -> None:
        try:
            result = DeliveryResult.model_validate_json(message.data)
        except ValueError as error:
            log.error("dropping an unreadable delivery result: %s", error)
            await message.term()
            return
        with consuming(RESULTS_DESTINATION, message.subject, message.headers):
            annotate(result.queue_id, attempt=result.attempt)
            await self._settle(message, result.queue_id, self._apply_result(result))

    async def _on_due(self, message: Msg) -> None:
        queue_id = message.subject.rsplit(".", 1)[-1]
        await self._settle(message, queue_id, self.retry_due, come_back=self.early_by)

    async def run_results(self) -> None:
        """Consume delivery results; each is acked only once its record reflects it."""
        await self._consume("kurrier.result.*", RESULTS_CONSUMER, RESULTS_STREAM, self._on_result)

    async def run_due(self) -> None:
        """Re-dispatch messages whose retry schedule fired (or that an admin released)."""
        await self._consume("kurrier.due.*", DUE_CONSUMER, JOBS_STREAM, self._on_due)
