"""Applying a delivery result to its record: final, deferred with backoff, or expired."""

from __future__ import annotations

import logging

from kurrier.core.message import DeliveryResult, MessageRecord
from kurrier.queue.changes import CHANGED, UNCHANGED, Change, Edit
from kurrier.queue.retry_schedule import RetrySchedule

log = logging.getLogger(__name__)


def apply_result(result: DeliveryResult, schedule: RetrySchedule) -> Change:
    """Each pending recipient the result speaks of gets its outcome; a result about
    recipients already final (applied before a crash) changes nothing."""

    def change(record: MessageRecord, now: float) -> Edit:
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
                state.relayed = outcome.relayed
            elif schedule.expired(record.received_at, now):
                state.status = "expired"
            else:
                state.status = "deferred"
                state.next_attempt = now + schedule.delay(state.attempts)
            log.info(
                "to=<%s> status=%s attempts=%d reply=%s",
                state.address,
                state.status,
                state.attempts,
                outcome.reply,
                extra={"queue_id": record.queue_id},
            )
        return CHANGED if changed else UNCHANGED

    return change
