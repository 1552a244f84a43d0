"""Which notifications a change of a message record owes its sender (pure).

A failure for each recipient that newly failed, a "relayed" notice for each
newly delivered to a next hop that does not offer DSN, and once per message
a delay warning when it has waited longer than the warning age: each only to
recipients whose NOTIFY (RFC 3461) asks for it. queue/manager.py stores them
before the record moves on; queue/dsn.py renders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kurrier.core.dsn_parameters import notify_allows
from kurrier.core.message import FAILED_STATUSES, MessageRecord, RecipientState
from kurrier.queue.dsn import DELAYED, FAILED, RELAYED, NoticeKind
from kurrier.queue.retry_schedule import RetrySchedule


@dataclass(frozen=True)
class OwedNotice:
    kind: NoticeKind
    recipients: list[RecipientState]
    # When the queue gives up on the recipients (for a delay warning), else None.
    will_retry_until: float | None = None


def take_owed_notices(
    record: MessageRecord, statuses_before: Sequence[str], schedule: RetrySchedule, now: float
) -> list[OwedNotice]:
    """The notices the change that left record as it is owes, in the order to send them.

    statuses_before holds each recipient's status as read, in record order. A
    delay warning is marked sent in the record (delay_warned), so that it goes
    once however often the change is applied: it is written with the record,
    after the notice is stored.
    """
    changed = [
        state
        for state, before in zip(record.recipients, statuses_before, strict=True)
        if state.status != before
    ]
    owed = [
        OwedNotice(kind, wanted)
        for kind, recipients in (
            (FAILED, [r for r in changed if r.status in FAILED_STATUSES]),
            (RELAYED, [r for r in changed if r.status == "delivered" and r.relayed]),
        )
        if (wanted := [r for r in recipients if notify_allows(r.notify, kind.condition)])
    ]
    delayed = [r for r in record.pending() if r.last_reply]
    if delayed and not record.delay_warned and schedule.warning_due(record.received_at, now):
        record.delay_warned = True
        wanted = [r for r in delayed if notify_allows(r.notify, DELAYED.condition)]
        if wanted:
            until = record.received_at + schedule.max_lifetime
            owed.append(OwedNotice(DELAYED, wanted, will_retry_until=until))
    return owed
