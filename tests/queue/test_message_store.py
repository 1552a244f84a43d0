"""MessageStore's lifecycle on a real nats-server: what each step leaves in JetStream."""

from __future__ import annotations

import asyncio
import io

import pytest
from kurrier.core.jetstream import (
    BODIES_STREAM,
    JOBS_STREAM,
    body_subject,
    connect,
    disconnect,
    ensure_layout,
    job_subject,
    schedule_subject,
)
from kurrier.core.message import DeliveryResult, MessageRecord, RecipientOutcome, RecipientState
from kurrier.core.records import RecordChanged, RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.queue.admin import hold
from kurrier.queue.manager import QueueManager
from kurrier.queue.results import apply_result
from kurrier.queue.retry_schedule import RetrySchedule
from nats.js import JetStreamContext

from tests.support.nats import NatsServer


def _template(queue_id: str) -> MessageRecord:
    return MessageRecord(
        queue_id=queue_id,
        mail_from="a@client.test",
        recipients=[RecipientState(address="r@example.com")],
        received_at=0.0,
        size=0,
        body_store="stream",
    )


async def _messages(js: JetStreamContext, stream: str, subject: str) -> int:
    subjects = (await js.stream_info(stream, subjects_filter=subject)).state.subjects or {}
    return subjects.get(subject, 0)


async def _manager(js: JetStreamContext) -> QueueManager:
    await ensure_layout(js)
    records = await RecordStore.open(js)
    # An hour's backoff: the deferred message keeps its schedule for the test's length.
    schedule = RetrySchedule(min_backoff=3600, max_backoff=3600)
    return QueueManager(js, records, TableFollower(), schedule, "relay.test")


async def _delete_a_deferred_message(nats_url: str) -> dict[str, int]:
    nc = await connect(nats_url, "test-message-store")
    try:
        js = nc.jetstream()
        manager = await _manager(js)
        queue_id = "DELETEDEFERRED000001"
        await manager.intake.accept(_template(queue_id), io.BytesIO(b"x\r\n"), 3)
        deferral = DeliveryResult(
            queue_id=queue_id,
            dispatch=1,
            outcomes=[RecipientOutcome(address="r@example.com", outcome="deferred", reply="451")],
        )
        await manager.mutate(queue_id, apply_result(deferral, manager.schedule))
        before = {
            "schedule": await _messages(js, JOBS_STREAM, schedule_subject(queue_id)),
            "jobs": await _messages(js, JOBS_STREAM, job_subject(queue_id)),
            "body": await _messages(js, BODIES_STREAM, body_subject(queue_id)),
        }
        assert before == {"schedule": 1, "jobs": 1, "body": 1}, before
        deleted = await manager.delete(queue_id)
        return {
            "deleted": int(deleted),
            "record": int(await manager.records.get(queue_id, fresh=True) is not None),
            "schedule": await _messages(js, JOBS_STREAM, schedule_subject(queue_id)),
            "jobs": await _messages(js, JOBS_STREAM, job_subject(queue_id)),
            "body": await _messages(js, BODIES_STREAM, body_subject(queue_id)),
            "deleted again": int(await manager.delete(queue_id)),
        }
    finally:
        await disconnect(nc)


def test_deleting_a_message_removes_its_record_body_schedule_and_jobs(
    nats_server: NatsServer,
) -> None:
    # The job of its first dispatch is still in the stream (no delivery worker
    # runs here), as a job waiting in a backlog would be.
    left = asyncio.run(_delete_a_deferred_message(nats_server.url))
    assert left == {
        "deleted": 1,
        "record": 0,
        "schedule": 0,
        "jobs": 0,
        "body": 0,
        "deleted again": 0,
    }


async def _finish_at_an_old_revision(nats_url: str) -> tuple[bool, bool]:
    nc = await connect(nats_url, "test-message-store")
    try:
        js = nc.jetstream()
        manager = await _manager(js)
        queue_id = "FINISHSTALE000000001"
        record = await manager.intake.accept(_template(queue_id), io.BytesIO(b"x\r\n"), 3)
        assert record is not None
        found = await manager.records.get(queue_id, fresh=True)
        assert found is not None
        _, revision = found
        held = await manager.mutate(queue_id, hold)
        assert held is not None and held.held
        with pytest.raises(RecordChanged):
            await manager.store.finish(queue_id, revision, "stream", scheduled=False)
        still = await manager.records.get(queue_id, fresh=True)
        body = await _messages(js, BODIES_STREAM, body_subject(queue_id))
        return still is not None, body == 1
    finally:
        await disconnect(nc)


def test_finishing_at_a_revision_the_record_left_changes_nothing(nats_server: NatsServer) -> None:
    # What delivery meets when an administrator held the message while its last job was out.
    record_kept, body_kept = asyncio.run(_finish_at_an_old_revision(nats_server.url))
    assert record_kept
    assert body_kept


async def _enqueue_twice(nats_url: str) -> tuple[bool, bool, int, int, int]:
    nc = await connect(nats_url, "test-message-store")
    try:
        js = nc.jetstream()
        manager = await _manager(js)
        queue_id = "ENQUEUEDTWICE0000001"
        first = await manager.intake.accept(_template(queue_id), io.BytesIO(b"x\r\n"), 3)
        # The client's retry after a reply it never saw: the same queue id again.
        second = await manager.intake.accept(_template(queue_id), io.BytesIO(b"x\r\n"), 3)
        found = await manager.records.get(queue_id, fresh=True)
        assert found is not None
        return (
            first is not None,
            second is not None,
            found[0].dispatches,
            await _messages(js, JOBS_STREAM, job_subject(queue_id)),
            await _messages(js, BODIES_STREAM, body_subject(queue_id)),
        )
    finally:
        await disconnect(nc)


def test_the_same_queue_id_enqueued_twice_is_stored_and_dispatched_once(
    nats_server: NatsServer,
) -> None:
    assert asyncio.run(_enqueue_twice(nats_server.url)) == (True, True, 1, 1, 1)
