"""A message as the queue leaves it for delivery: its record, and a job carrying its body."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from kurrier.core.body_store import store_body
from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    DISPATCH_STREAM,
    JOBS_STREAM,
    dispatch_subject,
)
from kurrier.core.message import BodyStore, DeliveryJob, MessageRecord, RecipientState
from kurrier.core.records import RecordStore
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError


def queued_record(queue_id: str) -> MessageRecord:
    """A record to r@example.com, its one-octet body inside it."""
    return MessageRecord(
        queue_id=queue_id,
        mail_from="a@client.test",
        recipients=[RecipientState(address="r@example.com")],
        received_at=time.time(),
        size=1,
        body_store="record",
        body=b"x",
    )


def template(queue_id: str) -> MessageRecord:
    """An envelope to r@example.com as Enqueue gives it to the intake (no body yet)."""
    return MessageRecord(
        queue_id=queue_id,
        mail_from="a@client.test",
        recipients=[RecipientState(address="r@example.com")],
        received_at=0.0,
        size=0,
        body_store="stream",
    )


async def store_record(js: JetStreamContext, queue_id: str) -> None:
    """A queued record to r@example.com (a job given again for a message with no record
    is taken as finished)."""
    assert await (await RecordStore.open(js)).create(queued_record(queue_id))


async def publish_job(
    js: JetStreamContext,
    queue_id: str,
    body: bytes | None = None,
    earlier: tuple[str, Callable[[str], str]] | None = None,
) -> None:
    """Its first dispatch's job to r@example.com. Without a body, one (Subject: the
    queue id) inside the job; with one, that body stored where the queue stores a
    body too large for its record, and the job naming where. earlier: the stream
    and subject where an earlier release's queue puts it (EARLIER_JOBS)."""
    if body is None:
        body = f"Subject: {queue_id}\r\n\r\nbody\r\n".encode()
        where: BodyStore = "record"
        inside: bytes | None = body
    else:
        where = await store_body(js, queue_id, io.BytesIO(body), len(body))
        inside = None
    job = DeliveryJob(
        queue_id=queue_id,
        dispatch=1,
        mail_from="a@client.test",
        recipients=["r@example.com"],
        size=len(body),
        body_store=where,
        body=inside,
        # As the queue says since KURRIER_DISPATCH; the one before had no such field.
        batched_results=earlier is None or earlier[0] != JOBS_STREAM,
    )
    stream, subject = earlier or (DISPATCH_STREAM, dispatch_subject)
    await js.publish(subject(queue_id), job.model_dump_json().encode(), stream=stream)


async def jobs_left(js: JetStreamContext) -> int:
    """Jobs delivery has not acknowledged, waiting or held: the jobs stream keeps
    acknowledged ones until the queue purges them (queue/acked_cleanup.py)."""
    try:
        info = await js.consumer_info(DISPATCH_STREAM, DELIVERY_CONSUMER)
    except NotFoundError:  # no worker has asked for a job yet
        return (await js.stream_info(DISPATCH_STREAM)).state.messages
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
