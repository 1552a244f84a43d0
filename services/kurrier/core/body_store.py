"""Message bodies in JetStream: in the message's record (place_body), else one
message of the bodies stream, or the object store when larger than one stream
message may be (INLINE_BODY_LIMIT).

A body in the record is stored and removed with it, so a message delivered at
its first attempt costs two synced writes whatever its size (the record's
creation and its removal), not four. It stays there only while nothing else
changes the record: the first change (a deferral, a result for some of its
recipients, a hold) stores a body larger than CARRIED_BODY_LIMIT on its own
first (core/message_store.py), so that the records the sweeper reads each round
and the queue caches stay small, and a change does not write the body again.
For the same reason a new body stays out of its record while delivery jobs
pile up (queue/job_backlog.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import IO

from kurrier.core.jetstream import (
    BODIES_STREAM,
    INLINE_BODY_LIMIT,
    MESSAGES_STREAM,
    OBJECT_BUCKET,
    RECORDS_PREFIX,
    body_subject,
)
from kurrier.core.message import CARRIED_BODY_LIMIT, BodyStore, DeliveryJob, MessageRecord
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

# The largest body kept in its record. Every pass over the records reads the
# bodies in them (queue/job_backlog.py bounds how many there are); past this
# size a body's own write and removal weigh less beside the body itself.
ATTACHED_BODY_LIMIT = 256 * 1024


def body_store_for(size: int) -> BodyStore:
    """Where store_body puts a body of this size (one too large for its record)."""
    return "stream" if size <= INLINE_BODY_LIMIT else "object"


def place_body(
    record: MessageRecord, body: IO[bytes], size: int, in_record: bool = True
) -> MessageRecord:
    """record (without a body yet) with its body where it is to be stored: inside
    it when at most CARRIED_BODY_LIMIT, or, unless in_record is False, at most
    ATTACHED_BODY_LIMIT with the record one stream message (INLINE_BODY_LIMIT);
    else outside."""
    if size <= CARRIED_BODY_LIMIT or (
        in_record
        and size <= ATTACHED_BODY_LIMIT
        and len(record.document()) + 1 + size <= INLINE_BODY_LIMIT
    ):
        body.seek(0)
        return record.model_copy(update={"body_store": "record", "body": body.read()})
    return record.model_copy(update={"body_store": body_store_for(size), "body": None})


async def store_body(js: JetStreamContext, queue_id: str, body: IO[bytes], size: int) -> BodyStore:
    """Store a body too large for its record durably (acknowledged by JetStream);
    the queue id makes a retry a no-op."""
    if body_store_for(size) == "stream":
        body.seek(0)
        await js.publish(
            body_subject(queue_id),
            body.read(),
            stream=BODIES_STREAM,
            headers={"Nats-Msg-Id": f"body:{queue_id}"},
        )
        return "stream"
    body.seek(0)
    store = await js.object_store(OBJECT_BUCKET)
    await store.put(queue_id, body)  # type: ignore[arg-type]
    return "object"


async def load_body(js: JetStreamContext, holder: MessageRecord | DeliveryJob) -> bytes:
    """The body of the message that holder (its record or one of its jobs) is about."""
    queue_id, where = holder.queue_id, holder.body_store
    if where == "record":
        if holder.body is None and isinstance(holder, DeliveryJob):
            return await _body_in_record(js, queue_id)
        return holder.body or b""
    if where == "stream":
        subject = body_subject(queue_id)
        try:
            message = await js.get_last_msg(BODIES_STREAM, subject, direct=True)
        except NotFoundError:
            # Any replica may answer a direct get, also one that has not applied
            # the body yet (a job can reach delivery first): only the stream's
            # leader can say it is gone.
            message = await js.get_last_msg(BODIES_STREAM, subject)
        return message.data or b""
    store = await js.object_store(OBJECT_BUCKET)
    result = await store.get(queue_id)
    return bytes(result.data or b"")


async def _body_in_record(js: JetStreamContext, queue_id: str) -> bytes:
    """The body of a job that leaves it in the message's record: there, or where
    the record has put it since (a change stores it on its own). NotFoundError
    when the record is gone: the message is over."""
    subject = RECORDS_PREFIX + queue_id
    try:
        stored = await js.get_last_msg(MESSAGES_STREAM, subject, direct=True)
    except NotFoundError:
        # A replica may answer before it has the record: the leader has it.
        stored = await js.get_last_msg(MESSAGES_STREAM, subject)
    if not stored.data:
        raise NotFoundError  # its removal's marker
    record = MessageRecord.from_document(stored.data)
    if record.body_store == "record":
        return record.body or b""
    return await load_body(js, record)


async def body_exists(js: JetStreamContext, queue_id: str, where: BodyStore) -> bool:
    """Whether the body is stored, asked of the leader (a replica may not have it yet)."""
    if where == "record":
        return True
    try:
        if where == "stream":
            await js.get_last_msg(BODIES_STREAM, body_subject(queue_id))
        else:
            store = await js.object_store(OBJECT_BUCKET)
            await store.get_info(queue_id)
    except NotFoundError:
        return False
    return True


async def delete_body(js: JetStreamContext, queue_id: str, where: BodyStore) -> None:
    if where == "record":
        return  # it went with the record
    try:
        if where == "stream":
            await js.purge_stream(BODIES_STREAM, subject=body_subject(queue_id))
        else:
            store = await js.object_store(OBJECT_BUCKET)
            await store.delete(queue_id)
    except NotFoundError:
        pass  # already gone: deleting twice after a crash is fine


async def stored_objects(js: JetStreamContext) -> dict[str, float]:
    """The bodies in the object store: queue id -> when its upload began (epoch seconds)."""
    store = await js.object_store(OBJECT_BUCKET)
    try:
        objects = await store.list(ignore_deletes=True)
    except NotFoundError:
        return {}
    return {info.name: _upload_began(info.mtime) for info in objects if info.name}


async def object_stored_at(js: JetStreamContext, queue_id: str) -> float | None:
    """When the object's upload began, as the store holds it now; None when gone."""
    store = await js.object_store(OBJECT_BUCKET)
    try:
        info = await store.get_info(queue_id)
    except NotFoundError:
        return None
    return _upload_began(info.mtime)


def _upload_began(mtime: str | None) -> float:
    # The client's clock at the start of the upload (nats-py writes it into
    # the object's metadata); an object without one is treated as new.
    try:
        return datetime.fromisoformat(mtime or "").timestamp()
    except ValueError:
        return float("inf")
