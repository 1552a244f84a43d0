"""Message records in the NATS KV bucket: the single source of truth about each message.

Reads, revision-guarded writes and removals of one record; the order in which
records, bodies, schedules and jobs are written is message_store.py's business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from kurrier.core.atomic_batches import AtomicBatches
from kurrier.core.jetstream import MESSAGES_BUCKET, MESSAGES_STREAM, RECORDS_PREFIX, one_pass
from kurrier.core.message import MessageRecord
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, Header
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, MSG_ROLLUP_SUBJECT, KeyValue

# Records this process updated last, so applying the next change usually needs
# no KV read first. Bounded; oldest go first. A new record is not kept: most
# are removed by delivery (delivery/completion.py), which the queue never
# hears of.
RECENT_LIMIT = 10_000
# A pass over the bucket is an ephemeral consumer on the server, which outlives
# the pass by this long (nats-py's default is 5 minutes: frequent passes, such
# as a depth gauge scraped often, then pile up to JetStream's consumer limit).


# A removal leaves a purge marker in the bucket (so watchers learn of the
# deletion); it expires after this long instead of piling up: markers cost
# nats-server memory, about a marker per finished message for as long as
# they live.
MARKER_TTL = 60.0

# JetStream's "wrong last sequence" errors: the subject moved past the
# revision the writer expected.
_WRONG_LAST_SEQUENCE = (10071, 10164)


class RecordChanged(Exception):
    """The record is no longer at the revision a write or removal expected."""


class RecordStore:
    def __init__(
        self,
        js: JetStreamContext,
        kv: KeyValue,
        at_leader: KeyValue,
        writes: AtomicBatches | None = None,
    ) -> None:
        self._js = js
        # Creates and guarded removals, the writes of every message, may share
        # atomic batches; updates are rarer and stay plain KV updates.
        self._writes = writes or AtomicBatches(js, MESSAGES_STREAM)
        self._kv = kv
        # Reads through the bucket's leader, to confirm that a record is gone:
        # a direct read may be answered by a replica that has not applied it yet.
        self._at_leader = at_leader
        # queue id -> (the record as stored, its revision). Kept serialised so
        # no caller can change a cached record behind the store's back.
        self._recent: dict[str, tuple[bytes, int]] = {}

    def _remember(self, queue_id: str, document: bytes, revision: int) -> None:
        self._recent.pop(queue_id, None)
        if len(self._recent) >= RECENT_LIMIT:
            del self._recent[next(iter(self._recent))]
        self._recent[queue_id] = (document, revision)

    @classmethod
    async def open(cls, js: JetStreamContext, writes: AtomicBatches | None = None) -> RecordStore:
        at_leader = KeyValue(
            name=MESSAGES_BUCKET,
            stream=MESSAGES_STREAM,
            pre=RECORDS_PREFIX,
            js=js,
            direct=False,
        )
        return cls(js, await js.key_value(MESSAGES_BUCKET), at_leader, writes)

    async def create(self, record: MessageRecord) -> int | None:
        """Store a new record; its revision, or None if one with this queue id exists
        already, or existed within JetStream's duplicate window (2 minutes).

        The second case is a message taken in again after its first copy
        finished (ingress sending it again after a broken stream, a result
        applied again after its notification was delivered): its body may be
        inside the record (core/body_store.py), so a record created again would
        be delivered again. Deduplicated, it is not created at all.
        """
        subject = RECORDS_PREFIX + record.queue_id
        document = record.document()
        last = 0
        for _ in range(2):
            headers = {
                Header.MSG_ID.value: f"record:{record.queue_id}",
                Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(last),
            }
            try:
                ack = await self._writes.publish(subject, document, headers)
            except APIError as error:
                if error.err_code not in _WRONG_LAST_SEQUENCE:
                    raise
                removed_at = await self._removed_at(subject)
                if removed_at is None:
                    return None
                last = removed_at
                continue
            return None if ack.duplicate else ack.seq
        return None

    async def _removed_at(self, subject: str) -> int | None:
        """The sequence of the removal marker that is the subject's last message, if it is one."""
        try:
            last = await self._js.get_last_msg(MESSAGES_STREAM, subject)
        except NotFoundError:
            return 0  # the marker expired meanwhile
        operation = (last.headers or {}).get(KV_OP)
        return last.seq if operation in (KV_PURGE, KV_DEL) and last.seq is not None else None

    async def get(
        self, queue_id: str, fresh: bool = False, at_leader: bool = False
    ) -> tuple[MessageRecord, int] | None:
        """The record and its revision, or None when there is no such message.

        Unless fresh, the copy this process wrote last may answer: if another
        process changed it since, the next update fails with RecordChanged and
        the caller reads again (fresh). A fresh read may still be answered by
        a replica that lags; at_leader reads the record as the stream's leader
        holds it, which reflects every write acknowledged so far.
        """
        recent = None if fresh or at_leader else self._recent.get(queue_id)
        if recent is not None:
            return MessageRecord.from_document(recent[0]), recent[1]
        entry = None if at_leader else await self._read(self._kv, queue_id)
        if entry is None:
            entry = await self._read(self._at_leader, queue_id)
        if entry is None:
            return None
        return MessageRecord.from_document(entry.value or b""), entry.revision or 0

    @staticmethod
    async def _read(kv: KeyValue, queue_id: str) -> KeyValue.Entry | None:
        try:
            entry = await kv.get(queue_id)
        except KeyNotFoundError:
            return None
        return entry if entry.value else None

    async def update(self, record: MessageRecord, revision: int) -> int:
        document = record.document()
        try:
            revision = await self._kv.update(record.queue_id, document, last=revision)
        except KeyWrongLastSequenceError as error:
            self._recent.pop(record.queue_id, None)
            raise RecordChanged(record.queue_id) from error
        self._remember(record.queue_id, document, revision)
        return revision

    async def delete(self, queue_id: str, revision: int | None = None) -> None:
        """Purge the record (every revision of it); with revision, only if it is still at it.

        Raises RecordChanged when revision is given and the record moved on (or
        is gone already).
        """
        self._recent.pop(queue_id, None)
        headers = {KV_OP: KV_PURGE, Header.ROLLUP.value: MSG_ROLLUP_SUBJECT}
        subject = RECORDS_PREFIX + queue_id
        try:
            if revision is None:
                await self._js.publish(subject, headers=headers, msg_ttl=MARKER_TTL)
                return
            headers[Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value] = str(revision)
            headers[Header.MSG_TTL.value] = str(int(MARKER_TTL))
            # The id makes the removal safe to send again (AtomicBatches); one
            # already stored comes back as a duplicate, which is a success.
            headers[Header.MSG_ID.value] = f"remove:{queue_id}:{revision}"
            await self._writes.publish(subject, b"", headers)
        except APIError as error:
            if revision is not None and error.err_code in _WRONG_LAST_SEQUENCE:
                raise RecordChanged(queue_id) from error
            raise

    async def all(self) -> AsyncIterator[MessageRecord]:
        """Every record, in one streamed pass over the bucket (not a request per key)."""
        passing = one_pass(
            self._js, RECORDS_PREFIX + ">", MESSAGES_STREAM, DeliverPolicy.LAST_PER_SUBJECT
        )
        async for message in passing:
            if message.data:  # a removal's purge marker is empty
                yield MessageRecord.from_document(message.data)
