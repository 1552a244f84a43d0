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


class RecordStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> RecordStore:
        return cls(await js.key_value(MESSAGES_BUCKET))

    async def create(self, record: MessageRecord) -> bool:
        """Store a new record; False if one with this queue id exists already."""
        try:
            await self._kv.create(record.queue_id, record.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def get(self, queue_id: str) -> tuple[MessageRecord, int] | None:
        """The record and its revision, or None when there is no such message."""
        try:
            entry = await self._kv.get(queue_id)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return MessageRecord.model_validate_json(entry.value), entry.revision or 0

    async def update(self, record: MessageRecord, revision: int) -> int:
        try:
            return await self._kv.update(
                record.queue_id, record.model_dump_json().encode(), last=revision
            )
        except KeyWrongLastSequenceError as error:
            raise RecordConflict(record.queue_id) from error

    async def delete(self, queue_id: str) -> None:
        await self._kv.purge(queue_id)

    async def count_by_state(self) -> Counter[str]:
        """How many records are active, deferred or held: one pass over the bucket."""
        return Counter([record.state async for record in self.all()])

    async def all(self) -> AsyncIterator[MessageRecord]:
        """Every record, in one streamed pass over the bucket (not a request per key)."""
        watcher = await self._kv.watchall(ignore_deletes=True)
        try:
            async for entry in watcher:
                if entry is None:
                    return  # the end-of-history marker: everything stored has been seen
                if entry.value:
                    yield MessageRecord.model_validate_json(entry.value)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
