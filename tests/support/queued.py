"""A message as the queue leaves it for delivery: its record, and a job carrying its body."""

from __future__ import annotations

import time

from kurrier.core.jetstream import JOBS_STREAM, job_subject
from kurrier.core.message import DeliveryJob, MessageRecord, RecipientState
from kurrier.core.records import RecordStore
from nats.js import JetStreamContext


async def store_record(js: JetStreamContext, queue_id: str) -> None:
    """A queued record to r@example.com (a job given again for a message with no record
    is taken as finished)."""
    record = MessageRecord(
        queue_id=queue_id,
        mail_from="a@client.test",
        recipients=[RecipientState(address="r@example.com")],
        received_at=time.time(),
        size=1,
        body_store="record",
        body=b"x",
    )
    assert await (await RecordStore.open(js)).create(record)


async def publish_job(js: JetStreamContext, queue_id: str) -> None:
    """Its first dispatch's job, the body (Subject: the queue id) inside."""
    body = f"Subject: {queue_id}\r\n\r\nbody\r\n".encode()
    job = DeliveryJob(
        queue_id=queue_id,
        dispatch=1,
        mail_from="a@client.test",
        recipients=["r@example.com"],
        size=len(body),
        body_store="record",
        body=body,
    )
    await js.publish(job_subject(queue_id), job.model_dump_json().encode(), stream=JOBS_STREAM)
