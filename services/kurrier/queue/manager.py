"""The queue manager: apply changes to message records, in the order MessageStore
sets out, and notify senders of what failed.

Which changes there are is elsewhere: results.py (delivery results),
retries.py (due retries and expiry), admin.py (hold, release, retry); the
JetStream consumers that drive them are in consumers.py.
"""

from __future__ import annotations

import datetime
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kurrier.core.atomic_batches import AtomicBatches
from kurrier.core.body_store import load_body
from kurrier.core.dsn_parameters import notify_allows
from kurrier.core.history import HISTORY, trace_id_of
from kurrier.core.jetstream import DISPATCH_STREAM
from kurrier.core.message import FAILED_STATUSES, FINAL_STATUSES, MessageRecord, RecipientState
from kurrier.core.message_store import MessageStore
from kurrier.core.metrics import RECIPIENTS_DEFERRED, count_final, tenant_label
from kurrier.core.records import RecordChanged, RecordStore
from kurrier.core.settings import BATCHED_RESULTS_BY_DEFAULT
from kurrier.core.table_store import TableFollower
from kurrier.queue.changes import Change
from kurrier.queue.dispatch import publish_jobs, report_dispatch
from kurrier.queue.dsn import FAILED, render_dsn
from kurrier.queue.intake import Intake
from kurrier.queue.notice_policy import withheld_because
from kurrier.queue.notices import OwedNotice, take_owed_notices
from kurrier.queue.retry_schedule import RetrySchedule
from kurrier.queue.spans import notifying
from nats.js import JetStreamContext

log = logging.getLogger(__name__)


def report_recipient_changes(record: MessageRecord, before: Sequence[str], now: float) -> None:
    """Count, and write into the history, the recipients a stored change of record moved on.

    before holds each recipient's status as read, in record order; called
    once the change is stored, so a write retried after a conflict counts once.
    A dispatch (back to queued) is in the history as its delivery attempt.
    """
    for state, previous in zip(record.recipients, before, strict=True):
        if state.status in (previous, "queued"):
            continue
        if state.status == "deferred":
            RECIPIENTS_DEFERRED.add(1, tenant_label(record.tenant))
        elif state.status in FINAL_STATUSES:
            count_final(state.status, record.received_at, now, record.tenant)
        HISTORY.record(
            record.queue_id,
            state.status,
            trace_id=trace_id_of(record.traceparent),
            at=now,
            recipient=state.address,
            reply=state.last_reply,
            next_attempt=_when(state.next_attempt) if state.status == "deferred" else "",
        )


@dataclass(frozen=True)
class Notified:
    """What became of a notification a change owed: sent (its queue id) or withheld (why)."""

    owed: OwedNotice
    notice_id: str = ""
    withheld: str = ""


def _report_notice(record: MessageRecord, notified: Notified, now: float) -> None:
    """The notification sent, or why none was, in the history after the change that owed it."""
    owed = notified.owed
    HISTORY.record(
        record.queue_id,
        "dsn" if notified.notice_id else "dsn withheld",
        trace_id=trace_id_of(record.traceparent),
        at=now,
        action=owed.kind.action,
        to=f"<{record.mail_from}>",
        recipients=", ".join(r.address for r in owed.recipients),
        notice=notified.notice_id,
        reason=notified.withheld,
    )


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


class QueueManager:
    def __init__(
        self,
        js: JetStreamContext,
        records: RecordStore,
        tables: TableFollower,
        schedule: RetrySchedule,
        hostname: str,
        jobs: AtomicBatches | None = None,
        batched_results: bool = BATCHED_RESULTS_BY_DEFAULT,
        bodies_in_records: Callable[[], bool] | None = None,
    ) -> None:
        self._js = js
        self._tables = tables
        self.schedule = schedule
        self._hostname = hostname
        job_writes = jobs or AtomicBatches(js, DISPATCH_STREAM)

        async def publish(record: MessageRecord, recipients: list[str], revision: int) -> None:
            await publish_jobs(
                job_writes, tables.table, record, recipients, revision, batched_results
            )

        self.store = MessageStore(js, records, publish, bodies_in_records)
        self.intake = Intake(self.store)

    @property
    def records(self) -> RecordStore:
        return self.store.records

    async def mutate(
        self, queue_id: str, change: Change, fresh: bool = False
    ) -> MessageRecord | None:
        """Read-modify-write with optimistic concurrency; None if there is no such message.

        fresh skips this process's copy of the record: admin actions must see
        what any other queue process did, a result or a due retry need not (a
        stale copy fails the update and is read again).

        A change that finds nothing to do is believed only of the record as the
        stream's leader holds it. This process's copy may predate what another
        queue process wrote since (a deferral, say): a due retry checked against
        it finds nothing due, is acknowledged, and the retry is gone. Reading at
        the leader costs a round trip, but only on that path, which the usual
        message never takes.
        """
        confirming = False
        while True:
            found = await self.records.get(queue_id, fresh=fresh, at_leader=confirming)
            if found is None:
                return None
            record, revision = found
            before = [r.status for r in record.recipients]
            now = time.time()
            edit = change(record, now)
            if not edit.changed:
                if confirming:
                    return record
                confirming = True
                continue
            # Notifications are stored before the record moves on, so a crash in
            # between re-applies the change and finds them stored.
            schedule = self.schedule.under_policy(self._tables.table.policy.delay_warning_time)
            notified = [
                await self._notify_sender(record, owed, now)
                for owed in take_owed_notices(record, before, schedule, now)
            ]
            try:
                if record.pending():
                    await self.store.update(record, revision, list(edit.dispatch))
                else:
                    await self.store.finish(queue_id, revision, record.body_store, record.scheduled)
            except RecordChanged:
                fresh = True
                continue
            report_recipient_changes(record, before, now)
            if edit.dispatch:
                report_dispatch(record, list(edit.dispatch), now)
            for notice in notified:
                _report_notice(record, notice, now)
            self._log_unwanted_failures(record, before)
            return record

    async def delete(self, queue_id: str) -> bool:
        removed = await self.store.delete(queue_id)
        if removed is not None:
            log.info("deleted by the administrator", extra={"queue_id": queue_id})
            HISTORY.record(queue_id, "deleted", trace_id=trace_id_of(removed.traceparent))
        return removed is not None

    async def _notify_sender(self, record: MessageRecord, owed: OwedNotice, now: float) -> Notified:
        """Store the notification owed, or say why none is sent."""
        if not record.mail_from:
            # RFC 5321 6.1: never bounce a bounce; log it and let it go.
            for recipient in owed.recipients if owed.kind is FAILED else []:
                log.warning(
                    "undeliverable notification to %s dropped: %s",
                    recipient.address,
                    recipient.last_reply,
                    extra={"queue_id": record.queue_id},
                )
            return Notified(owed, withheld="the message is a notification itself (null sender)")
        withheld = withheld_because(record, self._tables.table)
        if withheld:
            log.info(
                "no notification to <%s>: %s",
                record.mail_from,
                withheld,
                extra={"queue_id": record.queue_id},
            )
            return Notified(owed, withheld=withheld)
        original = await load_body(self._js, record)
        notice = render_dsn(
            record,
            owed.recipients,
            original,
            self._hostname,
            now,
            kind=owed.kind,
            will_retry_until=owed.will_retry_until,
        )
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
            # It quotes the original, so it travels as the original had to (RFC 8689 5).
            require_tls=record.require_tls,
            # A notice goes back the way its message's tenant sends mail.
            tenant=record.tenant,
        )
        with notifying(record, notice.queue_id, owed.kind.action):
            await self.intake.accept(template, io.BytesIO(notice.content), len(notice.content))
        log.info(
            "sender notified (%s) of %d recipient(s) in %s",
            owed.kind.action,
            len(owed.recipients),
            notice.queue_id,
            extra={"queue_id": record.queue_id},
        )
        return Notified(owed, notice_id=notice.queue_id)

    @staticmethod
    def _log_unwanted_failures(record: MessageRecord, statuses_before: Sequence[str]) -> None:
        """Failures whose recipient asked for no notification (NOTIFY) are only logged."""
        for state, before in zip(record.recipients, statuses_before, strict=True):
            newly_failed = state.status in FAILED_STATUSES and before != state.status
            if newly_failed and not notify_allows(state.notify, FAILED.condition):
                log.info(
                    "to=<%s> failed, no notification (NOTIFY=%s)",
                    state.address,
                    state.notify,
                    extra={"queue_id": record.queue_id},
                )
