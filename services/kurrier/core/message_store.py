"""A message's life in JetStream, and the order that makes every crash repairable.

A message is four kinds of thing: its body (the bodies stream or the object
store), its record (the kurrier-messages KV bucket), its jobs (one per route
and dispatch, in KURRIER_DELIVERY_JOBS) and at most one retry schedule (in
KURRIER_JOBS). A crash can stop any sequence of writes half way; the order
below makes each half-way state one that the sweeper repairs (queue/sweeper.py)
and none that loses an accepted message:

1. The body with the record (`create`): both are acknowledged before the
   client's answer and before any job, so a job always finds its body. A
   body that fits is inside its record (core/body_store.py, place_body), so
   both are one write: a crash cannot separate them. A larger body is
   written beside its record, not before it: a record whose body never came
   was never accepted (its client heard 451, or nothing), and the sweeper,
   finding the body gone at the stream's leader once the record's dispatch
   is old, removes it.
2. The record before its jobs (`create`, `update`). A job always has its
   record; a record whose job was lost is dispatched again by the sweeper.
   A new message is accepted once its record is stored: its first jobs go
   out after the client's answer, published again while NATS is away for
   FIRST_JOBS_WINDOW, and a crash or a refusal before they are stored
   leaves it to the sweeper. When the record cannot be stored the
   client hears 451, so what may be stored of it is taken back.
3. A record changes only at the revision it was read at (`update`,
   `finish`); a writer that lost the race reads again and re-applies. A
   body attached to the record is stored on its own before the record's
   first change drops it (`update`): a crash in between leaves a copy that
   nothing refers to once the message is over, which the sweeper removes.
4. The retry schedule after the record (`update`). A schedule always finds
   its record as it was written; a record whose schedule was lost is
   overdue, and the sweeper dispatches it.
5. The record before the body, schedule and jobs when a message ends
   (`finish`, `delete`). Once the record is gone the message is over for
   everyone; what a crash leaves behind is an orphan body (the sweeper
   deletes it; a body inside its record went with it), a schedule firing for
   no record or a job whose body is gone (both are acknowledged and dropped).

Delivery status notifications follow rule 2 of the message they report on:
the queue stores the notification (`create`) before the record moves on.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import logging
import time
from collections.abc import Awaitable, Callable
from typing import IO

from kurrier.core.background import Background
from kurrier.core.body_store import (
    body_exists,
    delete_body,
    object_stored_at,
    place_body,
    store_body,
)
from kurrier.core.jetstream import (
    BODIES_STREAM,
    DISPATCH_STREAM,
    EARLIER_JOBS,
    JOBS_STREAM,
    NATS_AWAY,
    body_subject,
    dispatch_subject,
    due_subject,
    schedule_subject,
    storage_full,
)
from kurrier.core.message import BodyStore, MessageRecord
from kurrier.core.records import RecordChanged, RecordStore
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

log = logging.getLogger(__name__)

# How long a refused Enqueue keeps trying to take back what it stored while
# NATS is away: a reconnect to another node takes a second or two (the
# connection's reconnect wait is 1 s), and the client waits for its 451.
TAKE_BACK_WINDOW = 5.0

# How long the first jobs of an accepted message are published again while NATS is
# away, before the sweeper is left to dispatch it (DISPATCH_GRACE, minutes later):
# a node restarting and its streams electing leaders take seconds, a frozen node is
# left for another after about 15 s of silence (jetstream.PING_INTERVAL). Their
# dedup ids make a job that was stored unanswered count once, inside the dispatch
# stream's duplicate window (2 minutes).
FIRST_JOBS_WINDOW = 60.0

# Publishes the jobs for these recipients of the record stored at this revision.
JobPublisher = Callable[[MessageRecord, list[str], int], Awaitable[None]]


async def _no_jobs(record: MessageRecord, recipients: list[str], revision: int) -> None:
    raise RuntimeError("this MessageStore does not dispatch")


async def _while_away(window: float, attempt: Callable[[], Awaitable[None]]) -> None:
    """attempt(), tried again while NATS is away (NATS_AWAY) for up to window seconds.
    Raises the last such error once the window is over, any other error at once."""
    deadline = time.monotonic() + window
    pause = 0.1
    while True:
        try:
            return await attempt()
        except NATS_AWAY:
            if time.monotonic() + pause > deadline:
                raise
        # A back-off between tries, not a wait for something to happen.
        await asyncio.sleep(pause)
        pause = min(pause * 2, 1.0)


class MessageStore:
    def __init__(
        self,
        js: JetStreamContext,
        records: RecordStore,
        publish_jobs: JobPublisher = _no_jobs,
        bodies_in_records: Callable[[], bool] | None = None,
    ) -> None:
        """bodies_in_records: whether a new message's body may be kept in its record
        now (queue/job_backlog.py; None: always); else only one of CARRIED_BODY_LIMIT
        or less is."""
        self._js = js
        self.records = records
        self._publish_jobs = publish_jobs
        self._bodies_in_records = bodies_in_records
        self._first_jobs = Background()

    async def create(
        self, record: MessageRecord, body: IO[bytes], size: int
    ) -> tuple[MessageRecord, int] | None:
        """Store a new message and send the jobs of its first dispatch on their way.

        record is complete but for where the body goes, and already marked
        dispatched. Returns once body and record are stored, which is when the
        message is accepted; its first jobs are published without the caller
        waiting for them (`first_jobs_sent` does, at shutdown), since a job
        lost to a crash or a refusal is the sweeper's to dispatch again.
        Idempotent per queue id: a body outside the record is deduplicated by
        JetStream, the record is created only once (and not again within
        JetStream's duplicate window once the message finished:
        RecordStore.create), and the first jobs carry the same dedup ids on
        every retry. Returns the record as stored and its revision, or None if
        a retry found the message already past its first dispatch or finished.
        """
        in_record = self._bodies_in_records is None or self._bodies_in_records()
        record = place_body(record, body, size, in_record)
        dispatch = [r.address for r in record.recipients if r.status == "queued"]
        try:
            revision = await self._create_record(record, body, size)
            if revision is None:
                found = await self.records.get(record.queue_id, fresh=True)
                if found is None or found[0].dispatches != 1:
                    return None
                record, revision = found
        except BaseException:
            # The caller answers 451 and the client keeps the message: take back
            # what was stored, or the sweeper would deliver it a second time.
            await self._take_back(record)
            raise
        self._first_jobs.start(self._publish_first_jobs(record, dispatch, revision))
        return record, revision

    async def _create_record(self, record: MessageRecord, body: IO[bytes], size: int) -> int | None:
        """RecordStore.create, with a body outside the record written at the same time:
        two synced writes side by side, not one after the other, before the answer."""
        if record.body_store == "record":
            return await self.records.create(record)
        storing = asyncio.ensure_future(store_body(self._js, record.queue_id, body, size))
        try:
            revision = await self.records.create(record)
        except BaseException:
            # What is taken back next must not be written after the take-back;
            # the record's error is the one raised, the body's is only collected.
            await asyncio.gather(storing, return_exceptions=True)
            raise
        await storing
        return revision

    async def _publish_first_jobs(
        self, record: MessageRecord, recipients: list[str], revision: int
    ) -> None:
        try:
            await _while_away(
                FIRST_JOBS_WINDOW, lambda: self._publish_jobs(record, recipients, revision)
            )
        except Exception as error:
            log.warning(
                "first jobs not published; the sweeper dispatches the message again: %r",
                error,
                extra={"queue_id": record.queue_id},
            )

    async def first_jobs_sent(self, within: float | None = None) -> None:
        """Wait until the first jobs of every message created so far are published or
        given up (a draining queue, so its last messages do not wait for the sweeper);
        at most `within` seconds, after which what is still being published is left to
        the sweeper, as a process that stops leaves it."""
        try:
            async with asyncio.timeout(within):
                await self._first_jobs.finished()
        except TimeoutError:
            log.warning(
                "stopping with the first jobs of %d message(s) not published; "
                "the sweeper dispatches them",
                len(self._first_jobs),
            )

    async def _take_back(self, record: MessageRecord) -> None:
        """Remove the record and body of a message the client is told 451 about.

        Often NATS is why the store failed: a connection dropped as a node
        restarted refuses the take-back at once too (nothing is buffered while
        disconnected), so it is tried again for TAKE_BACK_WINDOW, long enough
        to reconnect to another node. What is still stored then is left to the
        sweeper, which delivers it: a duplicate once the client sends it again.
        """

        async def remove() -> None:
            await self.records.delete(record.queue_id)
            await delete_body(self._js, record.queue_id, record.body_store)

        try:
            await _while_away(TAKE_BACK_WINDOW, remove)
        except NATS_AWAY as error:
            log.warning(
                "could not take back what may be stored of a refused message; "
                "the sweeper delivers a record left: %r",
                error,
                extra={"queue_id": record.queue_id},
            )
        except Exception as error:
            # Refused, not away: a full store refuses the removal's marker as it
            # refused the record. The sweeper is behind whatever remains.
            log.info(
                "take-back refused, the sweeper is behind what remains: %r",
                error,
                extra={"queue_id": record.queue_id},
            )

    async def update(self, record: MessageRecord, revision: int, dispatch: list[str]) -> int:
        """Write a changed record at its revision (else RecordChanged), then publish the
        jobs for dispatch, then arrange its next retry. Returns the new revision."""
        record.scheduled = any(r.status == "deferred" for r in record.pending())
        if record.body_attached:
            await self._detach_body(record)
        revision = await self.records.update(record, revision)
        if dispatch:
            await self._publish_jobs(record, dispatch, revision)
        await self._schedule_next(record)
        return revision

    async def _detach_body(self, record: MessageRecord) -> None:
        """Store the body attached to record on its own, and record without it.

        Stored before the record changes (rule 3): a job still out that leaves
        its body in the record then finds where it went (core/body_store.py).
        A change read again after losing a race stores it again, which its
        dedup id, or the bodies stream's one message per subject, makes one.
        When there is no room for it the body stays in the record, which keeps
        the change (a deferral, say) from waiting for room.
        """
        body = record.body or b""
        try:
            where = await store_body(self._js, record.queue_id, io.BytesIO(body), len(body))
        except APIError as error:
            if not storage_full(error):
                raise
            log.warning(
                "no room to store the body on its own; it stays in the record: %r",
                error,
                extra={"queue_id": record.queue_id},
            )
            return
        record.body_store, record.body = where, None

    async def finish(
        self,
        queue_id: str,
        revision: int,
        body_store: BodyStore,
        scheduled: bool,
        acknowledge: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """End a message with nothing left pending: its record at revision (else
        RecordChanged), then acknowledge what finished it, then body and schedule.

        A crash before the acknowledgement repeats the work that finished the
        message (at least once); one after it leaves what the sweeper removes.
        """
        await self.records.delete(queue_id, revision)
        if acknowledge is not None:
            await acknowledge()
        await self._remove_leftovers(queue_id, body_store, scheduled)

    async def delete(self, queue_id: str) -> MessageRecord | None:
        """Remove a message whatever its state (an administrator's delete): record,
        jobs not yet taken, body, schedule. Returns the record it removed, or None.

        A job a delivery worker holds already finds the body gone and is
        dropped, unless it loaded the body first or carries it (a body inside
        the record): then that one attempt is still made, as with Postfix's
        postsuper -d on the active queue.
        """
        while True:
            found = await self.records.get(queue_id, at_leader=True)
            if found is None:
                return None
            record, revision = found
            try:
                await self.records.delete(queue_id, revision)
            except RecordChanged:
                continue
            await self._js.purge_stream(DISPATCH_STREAM, subject=dispatch_subject(queue_id))
            for stream, subject in EARLIER_JOBS:
                await self._js.purge_stream(stream, subject=subject(queue_id))
            await self._remove_leftovers(queue_id, record.body_store, record.scheduled)
            return record

    async def body_exists(self, queue_id: str, where: BodyStore) -> bool:
        return await body_exists(self._js, queue_id, where)

    async def remove_orphan_body(
        self, queue_id: str, where: BodyStore, stored_before: float
    ) -> bool:
        """Delete a stored body that no record refers to, if it was stored before then.

        A body is stored beside its record, the two within an Enqueue's
        deadline of each other, so one stored after stored_before may be a
        message being accepted: it is left alone. A stream body is deleted by
        its sequence, so one stored again since (a client retrying with the
        same queue id) is not touched. An object has no sequence; its upload
        time is read again just before the delete, and a retry with the same
        queue id comes within an Enqueue's deadline, long before stored_before.
        """
        if where == "object":
            began = await object_stored_at(self._js, queue_id)
            if began is None or began > stored_before:
                return False
            await delete_body(self._js, queue_id, "object")
            return True
        try:
            body = await self._js.get_last_msg(BODIES_STREAM, body_subject(queue_id), direct=True)
        except NotFoundError:
            return False
        if body.time is None or body.time.timestamp() > stored_before or body.seq is None:
            return False
        await self._js.delete_msg(BODIES_STREAM, body.seq)
        return True

    async def _remove_leftovers(
        self, queue_id: str, body_store: BodyStore, scheduled: bool
    ) -> None:
        """What remains of a message whose record is gone: best effort, the sweeper is behind it."""
        try:
            if scheduled:
                await self._js.purge_stream(JOBS_STREAM, subject=schedule_subject(queue_id))
            await delete_body(self._js, queue_id, body_store)
        except (NatsError, TimeoutError) as error:
            log.warning(
                "message removed, but its body stays for the sweeper: %r",
                error,
                extra={"queue_id": queue_id},
            )

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
