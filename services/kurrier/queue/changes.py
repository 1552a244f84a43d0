"""Changes to a message record, and what each did: the queue's vocabulary of edits.

A change is a pure function of a record and the time. It edits the record in
place and says what it did: nothing (then nothing is written), an edit, or an
edit that dispatches some recipients now. QueueManager.mutate writes the edit
with optimistic concurrency and re-applies the change to a fresh read when
another process wrote first, so a change must give the same edit whenever it
is applied to the same record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kurrier.core.message import MessageRecord


@dataclass(frozen=True)
class Edit:
    changed: bool
    # Recipients to publish jobs for once the edit is stored.
    dispatch: tuple[str, ...] = ()


UNCHANGED = Edit(changed=False)
CHANGED = Edit(changed=True)


def dispatching(recipients: list[str]) -> Edit:
    return Edit(changed=True, dispatch=tuple(recipients))


Change = Callable[[MessageRecord, float], Edit]
