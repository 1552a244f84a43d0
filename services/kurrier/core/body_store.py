"""Message bodies in JetStream: in the record when small (core/message.py,
RECORD_BODY_LIMIT), one stream message when larger, the object store when large."""

from __future__ import annotations

from datetime import datetime
from typing import IO

from kurrier.core.jetstream import (
    BODIES_STREAM,
    INLINE_BODY_LIMIT,
    OBJECT_BUCKET,
    body_subject,
)
from kurrier.core.message import BodyStore, DeliveryJob, MessageRecord
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError


def body_store_for(size: int) -> BodyStore:
    """Where store_body puts a body of this size (one too large for its record)."""
    return "stream" if size <= INLINE_BODY_LIMIT else "object"


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
