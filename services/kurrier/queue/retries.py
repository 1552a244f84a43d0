"""When deferred recipients are tried again, and when they expire instead.

Each deferred message has one JetStream message schedule that fires into
kurrier.due.<id> when its earliest recipient is due (MessageStore keeps it);
whichever queue process pulls the due applies retry_due.
"""

from __future__ import annotations

from kurrier.core.message import MessageRecord
from kurrier.queue.changes import CHANGED, UNCHANGED, Change, Edit, dispatching
from kurrier.queue.dispatch import mark_dispatched
from kurrier.queue.retry_schedule import RetrySchedule


def retry_due(schedule: RetrySchedule) -> Change:
    """Dispatch the recipients that are due; past the message's lifetime, expire them."""

    def change(record: MessageRecord, now: float) -> Edit:
        if record.held:
            return UNCHANGED
        due = [r for r in record.pending() if r.next_attempt <= now]
        if not due:
            return UNCHANGED
        if schedule.expired(record.received_at, now):
            for state in due:
                state.status = "expired"
            return CHANGED
        addresses = [r.address for r in due]
        mark_dispatched(record, addresses, now)
        return dispatching(addresses)

    return change


def early_by(record: MessageRecord, now: float) -> float | None:
    """How early a due that found nothing to dispatch came, or None if it was not early.

    A schedule fires by the NATS server's clock, which may run ahead of the
    queue's: the due then finds its recipient not yet due, while the schedule
    that sent it is spent. Such a due must come back when the recipient is
    due. A held message (release sends a due), a job in flight (its result
    schedules what remains) or a finished message need no due.
    """
    pending = record.pending()
    if record.held or any(r.status == "queued" for r in pending):
        return None
    waiting = [r.next_attempt - now for r in pending if r.status == "deferred"]
    return max(0.0, min(waiting)) if waiting else None
