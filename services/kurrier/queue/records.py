"""Message records in the NATS KV bucket: the queue's single source of truth."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

from kurrier.core.jetstream import MESSAGES_BUCKET
from kurrier.core.message import MessageRecord
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue


class RecordConflict(Exception):
    """The record changed since it was read; read it again and redo the change."""


# Records this process wrote last, so applying a delivery result usually needs
# no KV read first (one round trip less per message). Bounded; oldest go first.
RECENT_LIMIT = 10_000
# A finished message leaves a purge marker in the bucket (so watchers learn of
# the deletion); it expires after this long instead of piling up. Markers
# cost nats-server memory: with an hour's TTL a 30-minute soak left 477 000
# of them, and nats-server at 490 MB RSS (backlog included).
MARKER_TTL = 60.0
# A pass over the bucket is an ephemeral consumer on the server, which outlives
# the pass by this long (nats-py's default is 5 minutes: frequent passes, such
# as a depth gauge scraped often, then pile up to JetStream's consumer limit).
PASS_CONSUMER_INACTIVE = 5.0


class RecordStore:
    def __init__(self, kv: KeyValue, at_leader: KeyValue) -> None:
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
    async def open(cls, js: JetStreamContext) -> RecordStore:
        at_leader = KeyValue(
            name=MESSAGES_BUCKET,
            stream=f"KV_{MESSAGES_BUCKET}",
            pre=f"$KV.{MESSAGES_BUCKET}.",
            js=js,
            direct=False,
        )
        return cls(await js.key_value(MESSAGES_BUCKET), at_leader)

    async def create(self, record: MessageRecord) -> bool:
        """Store a new record; False if one with this queue id exists already."""
        document = record.model_dump_json().encode()
        try:
            revision = await self._kv.create(record.queue_id, document)
        except KeyWrongLastSequenceError:
            return False
        self._remember(record.queue_id, document, revision)
        return True

    async def get(self, queue_id: str, fresh: bool = False) -> tuple[MessageRecord, int] | None:
        """The record and its revision, or None when there is no such message.

        Unless fresh, the copy this process wrote last may answer: if another
        process changed it since, the next update fails with RecordConflict and
        the caller reads again (fresh).
        """
        recent = None if fresh else self._recent.get(queue_id)
        if recent is not None:
            return MessageRecord.model_validate_json(recent[0]), recent[1]
        entry = await self._read(self._kv, queue_id)
        if entry is None:
            entry = await self._read(self._at_leader, queue_id)
        if entry is None:
            return None
        return MessageRecord.model_validate_json(entry.value or b""), entry.revision or 0

    @staticmethod
    async def _read(kv: KeyValue, queue_id: str) -> KeyValue.Entry | None:
        try:
            entry = await kv.get(queue_id)
        except KeyNotFoundError:
            return None
        return entry if entry.value else None

    async def update(self, record: MessageRecord, revision: int) -> int:
        document = record.model_dump_json().encode()
        try:
            revision = await self._kv.update(record.queue_id, document, last=revision)
        except KeyWrongLastSequenceError as error:
            self._recent.pop(record.queue_id, None)
            raise RecordConflict(record.queue_id) from error
        self._remember(record.queue_id, document, revision)
        return revision

    async def delete(self, queue_id: str) -> None:
        self._recent.pop(queue_id, None)
        await self._kv.purge(queue_id, msg_ttl=MARKER_TTL)

    async def count_by_state(self) -> Counter[str]:
        """How many records are active, deferred or held: one pass over the bucket."""
        return Counter([record.state async for record in self.all()])

    async def all(self) -> AsyncIterator[MessageRecord]:
        """Every record, in one streamed pass over the bucket (not a request per key)."""
        watcher = await self._kv.watchall(
            ignore_deletes=True, inactive_threshold=PASS_CONSUMER_INACTIVE
        )
        try:
            async for entry in watcher:
                if entry is None:
                    return  # the end-of-history marker: everything stored has been seen
                if entry.value:
                    yield MessageRecord.model_validate_json(entry.value)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
