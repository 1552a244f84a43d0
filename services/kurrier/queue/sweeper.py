"""The sweeper: repairs what a crash left half done, run by one queue process at a time.

Every SWEEP_INTERVAL it reads every record once and
- re-dispatches a recipient overdue by more than SWEEP_SLACK (its job lease
  ran out, or its retry schedule was lost);
- re-dispatches, sooner, a dispatch older than DISPATCH_GRACE for which
  JetStream holds neither a job nor a result: the process that stored the
  record died, or lost NATS, before the dispatch's job was stored (a new
  message's client has its 250 by then);
- removes a stored body (in the bodies stream or the object store) older
  than DISPATCH_GRACE that no record refers to:
  the message was finished or never stored whole, and a crash (of a queue
  process, or of nats-server before it persisted a purge) left the body;
- removes, instead of re-dispatching, a record whose body is gone. A live
  record always has its body (both stored before the answer, the body purged
  last), so such a record was never accepted: an Enqueue that failed and
  could not take its record back, or whose process died between the two
  writes. (A body inside its record cannot be gone while the record is there.)

Re-dispatching may duplicate a message, never lose one. Each repair of a
message goes into its history as `swept`, with what was done and why.
"""

from __future__ import annotations

import logging
import time

from kurrier.core.body_store import stored_objects
from kurrier.core.history import HISTORY, trace_id_of
from kurrier.core.jetstream import (
    BODIES_STREAM,
    DISPATCH_STREAM,
    EARLIER_JOBS,
    JOB_LEASE,
    OUTCOMES_STREAM,
    RESULTS_STREAM,
    body_subject,
    dispatch_subject,
    outcome_subject,
    result_subject,
)
from kurrier.core.message import BodyStore, MessageRecord
from kurrier.core.rounds import in_rounds
from kurrier.queue.changes import UNCHANGED, Change, Edit, dispatching
from kurrier.queue.dispatch import mark_dispatched
from kurrier.queue.manager import QueueManager
from kurrier.queue.retries import retry_due
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 60.0
# How late a due recipient must be before the sweeper (not its schedule or its
# job) is assumed to be the one that will act.
SWEEP_SLACK = 60.0
# Longer than any Enqueue (its deadline is 20 s) and the publish of its first
# jobs, or any dispatch, take: work this old that JetStream does not hold was
# never published, and will not be.
DISPATCH_GRACE = 120.0
# A stream holding more messages than this is not listed by subject; what the
# listing would find then waits for the lease (dispatches) or a later round.
LISTABLE = 10_000


class Sweeper:
    def __init__(self, js: JetStreamContext, manager: QueueManager) -> None:
        self._js = js
        self._manager = manager

    async def run(self) -> None:
        await in_rounds(SWEEP_INTERVAL, self.sweep, "sweeping", log)

    async def sweep(self, now: float | None = None) -> tuple[int, int]:
        """One round; returns (messages re-dispatched, orphaned bodies removed)."""
        now = time.time() if now is None else now
        live: set[str] = set()
        overdue: list[str] = []
        unconfirmed: dict[str, int] = {}
        bodies: dict[str, BodyStore] = {}
        dispatches: dict[str, int] = {}
        async for record in self._manager.records.all():
            live.add(record.queue_id)
            if record.held:
                continue
            pending = record.pending()
            if any(r.next_attempt < now - SWEEP_SLACK for r in pending):
                overdue.append(record.queue_id)
            elif any(
                r.status == "queued" and r.next_attempt - JOB_LEASE < now - DISPATCH_GRACE
                for r in pending
            ):
                unconfirmed[record.queue_id] = record.dispatches
            else:
                continue
            bodies[record.queue_id] = record.body_store
            dispatches[record.queue_id] = record.dispatches
        lost = await self._without_work(unconfirmed)
        redispatched = 0
        store = self._manager.store
        for queue_id in [*overdue, *lost]:
            if not await store.body_exists(queue_id, bodies[queue_id]):
                removed_record = await store.delete(queue_id)
                log.warning(
                    "sweeper removed a record whose body is gone (never accepted)",
                    extra={"queue_id": queue_id},
                )
                if removed_record is not None:
                    _report(removed_record, "removed", "its body is gone: it was never accepted")
                continue
            if queue_id in unconfirmed:
                change = _redispatch(unconfirmed[queue_id])
                after = await self._manager.mutate(queue_id, change, fresh=True)
                why = f"JetStream held no job and no result of dispatch {dispatches[queue_id]}"
            else:
                after = await self._manager.mutate(queue_id, retry_due(self._manager.schedule))
                why = "overdue: its job lease ran out or its retry schedule was lost"
            if after is not None and after.dispatches > dispatches[queue_id]:
                _report(after, "re-dispatched", why)
            redispatched += 1
        if redispatched:
            log.warning(
                "sweeper re-dispatched %d message(s) whose job or schedule was lost",
                redispatched,
            )
        removed = await self._remove_orphaned_bodies(live, now)
        if removed:
            log.warning("sweeper removed %d body(ies) no message refers to", removed)
        return redispatched, removed

    async def _subjects(self, stream: str, pattern: str) -> set[str] | None:
        """The subjects holding messages in stream, or None when it is too long to list."""
        held = (await self._js.stream_info(stream)).state.messages
        if held > LISTABLE:
            log.warning(
                "sweeper skips listing %s: %d messages, more than %d; what the listing "
                "would find waits for the job lease or a later round",
                stream,
                held,
                LISTABLE,
            )
            return None
        info = await self._js.stream_info(stream, subjects_filter=pattern)
        return set(info.state.subjects or {})

    async def _without_work(self, candidates: dict[str, int]) -> list[str]:
        """The candidates for which JetStream holds no job and no result.

        Read jobs first (earlier releases', then this one's),
        then results (of either stream), then (in mutate) the record: work
        moves in that order (a job is moved before it is acked, acked only
        after its result is stored, a result only after the record changed),
        so in-flight work is seen in at least one of them. A job or an outcome
        acknowledged stays in its stream until the queue purges below the ack
        floor: it counts as work for a few seconds more, which only leaves a
        dispatch to its lease.
        """
        if not candidates:
            return []
        busy: set[str] = set()
        where = (
            *EARLIER_JOBS,
            (DISPATCH_STREAM, dispatch_subject),
            (RESULTS_STREAM, result_subject),
            (OUTCOMES_STREAM, outcome_subject),
        )
        for stream, subject in where:
            subjects = await self._subjects(stream, subject("*"))
            if subjects is None:
                return []
            busy.update(name.rsplit(".", 1)[-1] for name in subjects)
        return [queue_id for queue_id in candidates if queue_id not in busy]

    async def _remove_orphaned_bodies(self, live: set[str], now: float) -> int:
        """Delete stored bodies older than DISPATCH_GRACE with no record.

        live was read before the bodies are listed, and a body is stored before
        its record is created, so a body too young to judge is left alone.
        """
        stored_before = now - DISPATCH_GRACE
        orphans: list[tuple[str, BodyStore]] = []
        subjects = await self._subjects(BODIES_STREAM, body_subject("*"))
        for subject in subjects or ():
            orphans.append((subject.rsplit(".", 1)[-1], "stream"))
        for queue_id, began in (await stored_objects(self._js)).items():
            if began <= stored_before:
                orphans.append((queue_id, "object"))
        store = self._manager.store
        removed = 0
        for queue_id, where in orphans:
            if queue_id not in live and await store.remove_orphan_body(
                queue_id, where, stored_before
            ):
                removed += 1
        return removed


def _report(record: MessageRecord, action: str, reason: str) -> None:
    HISTORY.record(
        record.queue_id,
        "swept",
        trace_id=trace_id_of(record.traceparent),
        action=action,
        reason=reason,
    )


def _redispatch(dispatch: int) -> Change:
    """Dispatch again the recipients of `dispatch`, if the record is still at it."""

    def change(record: MessageRecord, now: float) -> Edit:
        if record.held or record.dispatches != dispatch:
            return UNCHANGED
        addresses = [r.address for r in record.pending() if r.status == "queued"]
        if not addresses:
            return UNCHANGED
        mark_dispatched(record, addresses, now)
        return dispatching(addresses)

    return change
