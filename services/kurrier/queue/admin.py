"""What an administrator may do to a queued message (`kurrier queue hold|release|retry`).

Deleting goes through MessageStore.delete: it removes the message rather than
changing its record.
"""

from __future__ import annotations

from kurrier.core.message import MessageRecord
from kurrier.queue.changes import CHANGED, UNCHANGED, Edit


def hold(record: MessageRecord, now: float) -> Edit:
    if record.held:
        return UNCHANGED
    record.held = True
    return CHANGED


def release(record: MessageRecord, now: float) -> Edit:
    """Held recipients become due at once (or stay at their later retry time)."""
    if not record.held:
        return UNCHANGED
    record.held = False
    for state in record.pending():
        state.next_attempt = min(state.next_attempt, now)
    return CHANGED


def retry_now(record: MessageRecord, now: float) -> Edit:
    """Deferred recipients are due at once (postqueue -i)."""
    deferred = [r for r in record.pending() if r.status == "deferred"]
    if record.held or not deferred:
        return UNCHANGED
    for state in deferred:
        state.next_attempt = now
    return CHANGED
