"""MessageStore's lifecycle on a real nats-server: what each step leaves in JetStream,
also when a queue process dies half way through one."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import nats.errors
import pytest
from kurrier.core import message_store
from kurrier.core.body_store import ATTACHED_BODY_LIMIT, store_body
from kurrier.core.jetstream import (
    BODIES_STREAM,
    DISPATCH_STREAM,
    JOB_LEASE,
    JOBS_STREAM,
    body_subject,
    connect,
    disconnect,
    dispatch_subject,
    ensure_layout,
    schedule_subject,
)
from kurrier.core.message import (
    CARRIED_BODY_LIMIT,
    DeliveryResult,
    MessageRecord,
    RecipientOutcome,
)
from kurrier.core.records import RecordChanged, RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.queue.admin import hold
from kurrier.queue.manager import QueueManager
from kurrier.queue.results import apply_result
from kurrier.queue.retry_schedule import RetrySchedule
from kurrier.queue.sweeper import DISPATCH_GRACE, Sweeper
from nats.js import JetStreamContext

from tests.support.nats import NatsServer
from tests.support.queued import template

# Larger than a record keeps: a message of the bodies stream of its own.
TOO_LARGE_FOR_ITS_RECORD = b"x" * (ATTACHED_BODY_LIMIT + 1)


def _template(queue_id: str) -> MessageRecord:
    # Its sender gets notifications under any policy.
    return template(queue_id).model_copy(update={"client_trusted": True})


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
        # Attached to its record, then stored on its own by the deferral: a
        # message of its own to remove.
        body = b"x" * (CARRIED_BODY_LIMIT + 1)
        await manager.intake.accept(_template(queue_id), io.BytesIO(body), len(body))
        await manager.store.first_jobs_sent()
        deferral = DeliveryResult(
            queue_id=queue_id,
            dispatch=1,
            outcomes=[RecipientOutcome(address="r@example.com", outcome="deferred", reply="451")],
        )
        await manager.mutate(queue_id, apply_result(deferral, manager.schedule))
        before = {
            "schedule": await _messages(js, JOBS_STREAM, schedule_subject(queue_id)),
            "jobs": await _messages(js, DISPATCH_STREAM, dispatch_subject(queue_id)),
            "body": await _messages(js, BODIES_STREAM, body_subject(queue_id)),
        }
        assert before == {"schedule": 1, "jobs": 1, "body": 1}, before
        deleted = await manager.delete(queue_id)
        return {
            "deleted": int(deleted),
            "record": int(await manager.records.get(queue_id, fresh=True) is not None),
            "schedule": await _messages(js, JOBS_STREAM, schedule_subject(queue_id)),
            "jobs": await _messages(js, DISPATCH_STREAM, dispatch_subject(queue_id)),
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
        return still is not None, still is not None and still[0].body == b"x\r\n"
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
        await manager.store.first_jobs_sent()
        found = await manager.records.get(queue_id, fresh=True)
        assert found is not None
        return (
            first is not None,
            second is not None,
            found[0].dispatches,
            await _messages(js, DISPATCH_STREAM, dispatch_subject(queue_id)),
            await _messages(js, BODIES_STREAM, body_subject(queue_id)),
        )
    finally:
        await disconnect(nc)


def test_the_same_queue_id_enqueued_twice_is_stored_and_dispatched_once(
    nats_server: NatsServer,
) -> None:
    # The body is small enough to be inside the record: the bodies stream has none.
    assert asyncio.run(_enqueue_twice(nats_server.url)) == (True, True, 1, 1, 0)


async def _store_a_body_that_waits_for_its_record(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[bool, int]:
    nc = await connect(nats_url, "test-message-store")
    try:
        js = nc.jetstream()
        manager = await _manager(js)
        queue_id = "SIDEBYSIDE0000000001"
        create_record = manager.records.create
        record_stored = asyncio.Event()

        async def create_and_tell(record: MessageRecord) -> int | None:
            revision = await create_record(record)
            record_stored.set()
            return revision

        async def store_once_the_record_is_stored(*args: Any) -> Any:
            # Written one after the other, the record would wait for this body forever.
            async with asyncio.timeout(10):
                await record_stored.wait()
            return await store_body(*args)

        monkeypatch.setattr(manager.records, "create", create_and_tell)
        monkeypatch.setattr(message_store, "store_body", store_once_the_record_is_stored)
        body = TOO_LARGE_FOR_ITS_RECORD
        accepted = await manager.intake.accept(_template(queue_id), io.BytesIO(body), len(body))
        return accepted is not None, await _messages(js, BODIES_STREAM, body_subject(queue_id))
    finally:
        await disconnect(nc)


def test_a_larger_body_is_written_beside_its_record_not_before_it(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two synced writes side by side: the client's 250 waits for the slower, not the sum.
    assert asyncio.run(_store_a_body_that_waits_for_its_record(nats_server.url, monkeypatch)) == (
        True,
        1,
    )


async def _accept_without_a_bodies_stream(nats_url: str) -> tuple[bool, bool]:
    nc = await connect(nats_url, "test-message-store")
    try:
        js = nc.jetstream()
        manager = await _manager(js)
        await js.delete_stream(BODIES_STREAM)  # the body's write must fail
        queue_id = "BODYREFUSED000000001"
        body = TOO_LARGE_FOR_ITS_RECORD
        try:
            await manager.intake.accept(_template(queue_id), io.BytesIO(body), len(body))
        except nats.errors.Error:
            refused = True
        else:
            refused = False
        return refused, await manager.records.get(queue_id, fresh=True) is None
    finally:
        await disconnect(nc)


def test_a_refused_body_takes_back_the_record_written_beside_it(nats_server: NatsServer) -> None:
    # The client hears 451 and sends again: a record left would be removed by the
    # sweeper only minutes later, and a retry within them would find it and no body.
    refused, record_gone = asyncio.run(_accept_without_a_bodies_stream(nats_server.url))
    assert refused
    assert record_gone


class Crash(BaseException):
    """The queue process dying at this point: nothing after it runs, nothing catches it."""


CRASH_POINTS = ("before the notice", "after the notice", "after the record")


def _bounce(queue_id: str) -> DeliveryResult:
    return DeliveryResult(
        queue_id=queue_id,
        dispatch=1,
        outcomes=[
            RecipientOutcome(address="r@example.com", outcome="bounced", reply="550 5.1.1 gone")
        ],
    )


async def _notifications(js: JetStreamContext, queue_id: str) -> dict[str, tuple[int, int]]:
    """Each notification stored about queue_id, by its queue id: (its jobs, its bodies,
    in the bodies stream or inside its record)."""
    prefix = f"{queue_id}N"
    jobs = await js.stream_info(DISPATCH_STREAM, subjects_filter=dispatch_subject("*"))
    bodies = await js.stream_info(BODIES_STREAM, subjects_filter=body_subject("*"))
    records = await RecordStore.open(js)
    in_records = {r.queue_id: r.body async for r in records.all() if r.queue_id.startswith(prefix)}
    ids = set(in_records)
    for info in (jobs, bodies):
        subjects = (info.state.subjects or {}).keys()
        ids |= {s.rsplit(".", 1)[-1] for s in subjects if s.rsplit(".", 1)[-1].startswith(prefix)}
    return {
        notice: (
            (jobs.state.subjects or {}).get(dispatch_subject(notice), 0),
            (bodies.state.subjects or {}).get(body_subject(notice), 0)
            + int(in_records.get(notice) is not None),
        )
        for notice in ids
    }


async def _bounce_in_a_crashing_process(
    js: JetStreamContext, queue_id: str, crash_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accept a message, then apply its bounce in a queue process that dies at crash_at."""
    first = await _manager(js)
    await first.intake.accept(_template(queue_id), io.BytesIO(b"x\r\n"), 3)
    store_notice, finish = first.intake.accept, first.store.finish

    async def crash_before(*args: Any) -> Any:
        raise Crash

    async def crash_after_notice(*args: Any) -> Any:
        await store_notice(*args)
        raise Crash

    async def crash_after_record(*args: Any, **kwargs: Any) -> None:
        await finish(*args, **kwargs)
        raise Crash

    if crash_at == "before the notice":
        monkeypatch.setattr(first.intake, "accept", crash_before)
    elif crash_at == "after the notice":
        monkeypatch.setattr(first.intake, "accept", crash_after_notice)
    else:
        monkeypatch.setattr(first.store, "finish", crash_after_record)
    with pytest.raises(Crash):
        await first.mutate(queue_id, apply_result(_bounce(queue_id), first.schedule))
    # What it had sent on its way before dying is out, as when the crash came later.
    await first.store.first_jobs_sent()


async def _crash_while_bouncing(
    nats_url: str, crash_at: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, tuple[int, int]], bool, int]:
    """A bounce applied by a queue process that dies at crash_at, then by another.

    Returns the notifications stored, whether the bounced message's record is
    still there, and how many bodies it left.
    """
    crashing = await connect(nats_url, "test-crashing-queue")
    survivor = await connect(nats_url, "test-surviving-queue")
    try:
        queue_id = f"BOUNCECRASH{CRASH_POINTS.index(crash_at):09d}"
        await _bounce_in_a_crashing_process(crashing.jetstream(), queue_id, crash_at, monkeypatch)
        # The result was never acknowledged: JetStream gives it to another process.
        js = survivor.jetstream()
        second = await _manager(js)
        await second.mutate(queue_id, apply_result(_bounce(queue_id), second.schedule))
        await second.store.first_jobs_sent()
        return (
            await _notifications(js, queue_id),
            await second.records.get(queue_id, fresh=True) is not None,
            await _messages(js, BODIES_STREAM, body_subject(queue_id)),
        )
    finally:
        await disconnect(survivor)
        await disconnect(crashing)


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_a_bounce_applied_again_after_a_crash_notifies_the_sender_once(
    nats_server: NatsServer, crash_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The notification is stored before the record moves on, under a queue id
    # the record's state decides, so the second process stores the same one.
    notices, record_left, bodies_left = asyncio.run(
        _crash_while_bouncing(nats_server.url, crash_at, monkeypatch)
    )
    assert list(notices.values()) == [(1, 1)], f"one notification, its job and body: {notices}"
    assert (record_left, bodies_left) == (False, 0), "the bounced message is finished"


async def _bounce_again_once_the_notice_was_delivered(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]], bool]:
    crashing = await connect(nats_url, "test-crashing-queue")
    survivor = await connect(nats_url, "test-surviving-queue")
    try:
        queue_id = "BOUNCEDELIVERED00001"
        await _bounce_in_a_crashing_process(
            crashing.jetstream(), queue_id, "after the notice", monkeypatch
        )
        js = survivor.jetstream()
        second = await _manager(js)
        # Delivery sends the notification before the result comes back: it takes
        # and acknowledges the job, and finishes the notification's message.
        notice = f"{queue_id}N1"
        found = await second.records.get(notice, fresh=True)
        assert found is not None
        await js.purge_stream(DISPATCH_STREAM, subject=dispatch_subject(notice))
        await second.store.finish(notice, found[1], "stream", scheduled=False)

        await second.mutate(queue_id, apply_result(_bounce(queue_id), second.schedule))
        await second.store.first_jobs_sent()
        applied_again = await _notifications(js, queue_id)
        # The sweeper's round once the notification's lease has long run out.
        await Sweeper(js, second).sweep(now=time.time() + JOB_LEASE + 2 * DISPATCH_GRACE)
        return (
            applied_again,
            await _notifications(js, queue_id),
            await second.records.get(queue_id, fresh=True) is not None,
        )
    finally:
        await disconnect(survivor)
        await disconnect(crashing)


def test_a_bounce_applied_again_after_its_notice_was_delivered_sends_no_second(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Within JetStream's duplicate window (2 minutes) the notification's record
    # is deduplicated away (RecordStore.create), so nothing of it is stored
    # again. (docs/reliability.md)
    applied_again, swept, record_left = asyncio.run(
        _bounce_again_once_the_notice_was_delivered(nats_server.url, monkeypatch)
    )
    assert applied_again == {}, "no record, no body, no job"
    assert (swept, record_left) == ({}, False)
