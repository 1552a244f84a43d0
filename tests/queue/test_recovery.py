"""Crash windows the queue must heal by itself: a record stored whose job never went out."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
import smtplib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import nats.errors
import pytest
from kurrier.core import message_store
from kurrier.core.atomic_batches import AtomicBatches
from kurrier.core.body_store import store_body, stored_objects
from kurrier.core.history import HISTORY, history_subject
from kurrier.core.jetstream import (
    BODIES_STREAM,
    DISPATCH_STREAM,
    EARLIER_JOBS,
    INLINE_BODY_LIMIT,
    JOB_LEASE,
    MESSAGES_BUCKET,
    NATS_AWAY,
    OUTCOMES_STREAM,
    body_subject,
    connect,
    disconnect,
    dispatch_subject,
    ensure_layout,
    outcome_subject,
    when_answered,
)
from kurrier.core.message import BodyStore, MessageRecord, RecipientState
from kurrier.core.message_store import MessageStore
from kurrier.core.records import RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.queue.dispatch import mark_dispatched, publish_jobs
from kurrier.queue.history_search import search_history
from kurrier.queue.manager import QueueManager
from kurrier.queue.retry_schedule import RetrySchedule
from kurrier.queue.sweeper import DISPATCH_GRACE, Sweeper
from kurrier.v1 import queue_pb2, queue_pb2_grpc
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig

from tests.support.nats import NatsServer
from tests.support.processes import eventually, port_open, wait_until
from tests.support.relay import (
    ServiceRelay,
    documents,
    route,
    stored_jobs,
    trusting,
    wait_until_drained,
)
from tests.support.sink import Sink


def _record(queue_id: str, received_at: float, size: int, **fields: object) -> MessageRecord:
    """A message from a@client.test to r@example.com, its body in the stream unless
    fields say otherwise."""
    return MessageRecord.model_validate(
        {
            "queue_id": queue_id,
            "mail_from": "a@client.test",
            "recipients": [RecipientState(address="r@example.com")],
            "received_at": received_at,
            "size": size,
            "body_store": "stream",
            **fields,
        }
    )


async def _orphan_record(nats_url: str, queue_id: str, body: bytes) -> None:
    """What a queue crash between storing the record and publishing its job leaves behind."""
    nc = await connect(nats_url, "test-crash")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        where = await store_body(js, queue_id, io.BytesIO(body), len(body))
        lease_ran_out = time.time() - 3600
        record = MessageRecord(
            queue_id=queue_id,
            mail_from="a@client.test",
            recipients=[
                RecipientState(address="r@example.com", attempts=1, next_attempt=lease_ran_out)
            ],
            received_at=lease_ran_out,
            size=len(body),
            body_store=where,
            dispatches=1,
        )
        assert await (await RecordStore.open(js)).create(record)
    finally:
        await disconnect(nc)


def test_a_record_whose_job_was_lost_is_swept_and_delivered(
    tmp_path: Path, sink: Sink, nats_server: NatsServer
) -> None:
    body = b"Subject: orphan\r\n\r\nlost job\r\n"
    asyncio.run(_orphan_record(nats_server.url, "ORPHAN0000000000001", body))
    relay = ServiceRelay(tmp_path, nats_server.url)
    relay.publish(documents(route("r", ["example.com"], sink.port), trusting("127.0.0.0/8")))
    with relay:
        [delivered] = sink.wait_for(1, timeout=60)
        wait_until_drained(nats_server.url, 30)
        # And the relay still takes new mail normally afterwards.
        with smtplib.SMTP("127.0.0.1", relay.smtp_port) as smtp:
            smtp.sendmail("a@client.test", ["r@example.com"], b"Subject: fresh\r\n\r\nx\r\n")
        sink.wait_for(2)
    assert delivered.content == body


@contextlib.asynccontextmanager
async def _intake_without_a_jobs_stream(
    nats_url: str,
) -> AsyncIterator[tuple[JetStreamContext, QueueManager]]:
    """A queue's intake whose first jobs no stream takes: the dispatch stream is gone,
    as it is to a publish while its stream elects a leader."""
    nc = await connect(nats_url, "test-intake")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        await js.delete_stream(DISPATCH_STREAM)
        records = await RecordStore.open(js)
        yield js, QueueManager(js, records, TableFollower(), RetrySchedule(), "relay.test")
    finally:
        await disconnect(nc)


async def _accept(manager: QueueManager, queue_id: str) -> bool:
    """Whether the intake accepts a 3-octet message under queue_id."""
    accepted = await manager.intake.accept(_record(queue_id, 0.0, 0), io.BytesIO(b"x\r\n"), 3)
    return accepted is not None


async def _kept(manager: QueueManager, queue_id: str) -> bool:
    return await manager.store.records.get(queue_id, fresh=True) is not None


async def _accept_without_a_jobs_stream(nats_url: str) -> tuple[bool, bool]:
    async with _intake_without_a_jobs_stream(nats_url) as (_, manager):
        accepted = await _accept(manager, "KEPTRECORD0000000001")
        await manager.store.first_jobs_sent()
        return accepted, await _kept(manager, "KEPTRECORD0000000001")


def test_a_refused_first_job_leaves_the_accepted_message_to_the_sweeper(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client has its 250 once the record is stored: taking the record back
    # would lose the message. The sweeper dispatches it again
    # (test_a_dispatch_whose_job_was_never_published_is_redone_before_its_lease).
    # No stream answers the publish for longer than the (narrowed) window.
    monkeypatch.setattr(message_store, "FIRST_JOBS_WINDOW", 0.5)
    with caplog.at_level(logging.WARNING, logger="kurrier.core.message_store"):
        accepted, kept = asyncio.run(_accept_without_a_jobs_stream(nats_server.url))
    assert accepted
    assert kept
    assert "first jobs not published; the sweeper dispatches the message again" in caplog.text


async def _accept_while_the_jobs_stream_is_away(nats_url: str) -> tuple[int, int]:
    """A message accepted while no stream answers its job's publish (a leader being
    elected after a node was lost), the stream answering again within the window."""
    async with _intake_without_a_jobs_stream(nats_url) as (js, manager):
        tries = 0
        publish = manager.store._publish_jobs

        async def counted(record: MessageRecord, recipients: list[str], revision: int) -> None:
            nonlocal tries
            tries += 1
            await publish(record, recipients, revision)

        manager.store._publish_jobs = counted
        assert await _accept(manager, "JOBSAGAIN00000000001")
        await eventually(lambda: tries >= 2, 10, "the publish to be refused and tried again")
        await ensure_layout(js, streams=[DISPATCH_STREAM])
        await manager.store.first_jobs_sent()
        return tries, (await js.stream_info(DISPATCH_STREAM)).state.messages


def test_a_first_job_is_published_again_while_its_stream_does_not_answer(
    nats_server: NatsServer,
) -> None:
    # Left to the sweeper, the message would wait minutes (DISPATCH_GRACE) after a
    # node loss that heals in seconds.
    tries, jobs = asyncio.run(_accept_while_the_jobs_stream_is_away(nats_server.url))
    assert tries > 2
    assert jobs == 1


async def _stop_while_the_jobs_stream_is_away(nats_url: str) -> tuple[float, bool]:
    """How long a stopping queue waits for a first job that no stream takes, and whether
    the accepted message's record is still there for the sweeper."""
    async with _intake_without_a_jobs_stream(nats_url) as (_, manager):
        assert await _accept(manager, "JOBSATSTOP0000000001")
        started = time.monotonic()
        await manager.store.first_jobs_sent(within=1.0)
        waited = time.monotonic() - started
        return waited, await _kept(manager, "JOBSATSTOP0000000001")


def test_a_stopping_queue_waits_for_unpublished_first_jobs_only_so_long(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Without the bound it would wait out FIRST_JOBS_WINDOW (a minute), past the
    # pod's termination grace; the message stays the sweeper's either way.
    with caplog.at_level(logging.WARNING, logger="kurrier.core.message_store"):
        waited, kept = asyncio.run(_stop_while_the_jobs_stream_is_away(nats_server.url))
    assert 1.0 <= waited < message_store.FIRST_JOBS_WINDOW / 2
    assert kept
    assert "stopping with the first jobs of 1 message(s) not published" in caplog.text


async def _create_while_its_jobs_wait(nats_url: str) -> tuple[list[str], list[str]]:
    nc = await connect(nats_url, "test-intake")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        records = await RecordStore.open(js)
        released = asyncio.Event()
        published: list[str] = []

        async def publish_once_released(
            record: MessageRecord, recipients: list[str], revision: int
        ) -> None:
            await released.wait()
            published.append(record.queue_id)

        store = MessageStore(js, records, publish_once_released)
        record = _record("JOBSAFTER00000000001", time.time(), 3)
        # A create that waited for its jobs would never return here.
        await asyncio.wait_for(store.create(record, io.BytesIO(b"x\r\n"), 3), 30)
        on_return = list(published)
        released.set()
        await store.first_jobs_sent()
        return on_return, published
    finally:
        await disconnect(nc)


def test_a_message_is_accepted_once_stored_and_its_first_jobs_follow(
    nats_server: NatsServer,
) -> None:
    on_return, after_drain = asyncio.run(_create_while_its_jobs_wait(nats_server.url))
    assert on_return == []
    # A draining queue waits for them: its last messages do not wait for the sweeper.
    assert after_drain == ["JOBSAFTER00000000001"]


async def _enqueue_one(address: str, queue_id: str) -> int:
    """The queue's answer code (0: stored) to one small message sent on EnqueueMessages."""
    request = queue_pb2.EnqueueMessageRequest(
        envelope=queue_pb2.Envelope(
            queue_id=queue_id, mail_from="a@client.test", recipients=["r@example.com"], size=3
        ),
        body=b"x\r\n",
    )
    async with grpc.aio.insecure_channel(address) as channel:
        call = queue_pb2_grpc.QueueServiceStub(channel).EnqueueMessages(
            timeout=30, wait_for_ready=True
        )
        await call.write(queue_pb2.EnqueueBatch(messages=[request]))
        await call.done_writing()
        response = await call.read()
        assert response is not grpc.aio.EOF
        [result] = response.results
        code: int = result.code
        return code


async def _without_the_jobs_stream(nats_url: str, restored: bool) -> None:
    nc = await connect(nats_url, "test-intake")
    try:
        js = nc.jetstream()
        if restored:
            await ensure_layout(js, streams=[DISPATCH_STREAM])
        else:
            await js.delete_stream(DISPATCH_STREAM)
    finally:
        await disconnect(nc)


def test_a_stopping_queue_process_publishes_the_first_jobs_it_still_owes(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # The drain wiring of the queue's process (queue/main.py), not only
    # MessageStore.first_jobs_sent: a queue that left NATS at once would leave
    # its last message to the sweeper, minutes later (DISPATCH_GRACE).
    relay = ServiceRelay(tmp_path, nats_server.url)
    relay.start("queue")
    queue = relay.processes["queue"]
    try:
        asyncio.run(_without_the_jobs_stream(nats_server.url, restored=False))
        assert asyncio.run(_enqueue_one(relay.queue_address, "JOBSOWED000000000001")) == 0
        # Accepted, and its first job is being published again and again: no stream
        # takes it.
        queue.send_signal(signal.SIGTERM)
        queue_port = int(relay.queue_address.rsplit(":", 1)[1])
        wait_until(lambda: not port_open(queue_port), 30, "the queue to close its gRPC port")
        assert queue.poll() is None, "the queue left with a first job unpublished"
        asyncio.run(_without_the_jobs_stream(nats_server.url, restored=True))
        assert queue.wait(timeout=30) == 0
    finally:
        relay.__exit__()
    assert stored_jobs(nats_server.url) == 1
    log = (tmp_path / "queue.log").read_text(errors="replace")
    assert "first jobs of" not in log and "first jobs not published" not in log


async def _accept_as_the_connection_drops(server: NatsServer) -> tuple[bool, bool]:
    """An Enqueue whose record is stored just before its NATS server restarts: the
    record's acknowledgement is lost with the connection and, at first, the take-back
    is refused at once (nothing is buffered while the client is disconnected)."""
    nc = await connect(server.url, "test-intake")
    restarted: asyncio.Future[None] | None = None
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        records = await RecordStore.open(js)
        create_record = records.create

        async def create_as_the_server_restarts(record: MessageRecord) -> int | None:
            nonlocal restarted
            await create_record(record)
            server.stop(kill=True)
            await eventually(lambda: not nc.is_connected, 10, "the client to see it gone")
            restarted = asyncio.get_running_loop().run_in_executor(None, server.start)
            # What the caller sees of a publish whose acknowledgement never came.
            raise nats.errors.TimeoutError

        records.create = create_as_the_server_restarts  # type: ignore[method-assign]
        record = _record("TAKEBACK000000000002", time.time(), 3)
        store = MessageStore(js, records)
        try:
            await store.create(record, io.BytesIO(b"x\r\n"), 3)
        except NATS_AWAY:
            failed = True
        else:
            failed = False
        assert restarted is not None
        await restarted
        await eventually(lambda: nc.is_connected, 30, "the client to reconnect")
        gone = await when_answered(lambda: records.get(record.queue_id, fresh=True), "the record")
        return failed, gone is None
    finally:
        if restarted is not None:
            await restarted
        await disconnect(nc)


def test_a_record_is_taken_back_once_a_restarted_server_is_back(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the take-back tried again, the record stays until the sweeper, which
    # delivers a message its client was told 451 about, and sends again. The window
    # is widened so a slow restart on a busy machine cannot outlast it: what is
    # tested is that the take-back waits out a reconnect (with no window it fails).
    monkeypatch.setattr(message_store, "TAKE_BACK_WINDOW", 60.0)
    failed, record_gone = asyncio.run(_accept_as_the_connection_drops(nats_server))
    assert failed
    assert record_gone


async def _sweeper(js: JetStreamContext) -> tuple[RecordStore, Sweeper]:
    await ensure_layout(js)
    records = await RecordStore.open(js)
    manager = QueueManager(js, records, TableFollower(), RetrySchedule(), "relay.test")
    return records, Sweeper(js, manager)


async def _history_of(js: JetStreamContext, queue_id: str) -> list[tuple[str, dict[str, str]]]:
    """What this process wrote into queue_id's history, as `kurrier queue history` reads it."""
    await HISTORY.flush(js, history_subject("queue"))
    # since: these test ids hold no arrival time to start the search from.
    return [(e.event, e.details) for e in await search_history(js, queue_id, "", "", since=1.0)]


async def _sweep_after_a_crash_mid_enqueue(
    nats_url: str,
) -> tuple[int, int, int, int, int, list[tuple[str, dict[str, str]]]]:
    """A record two dispatch-graces old; the sweeper runs with its job present, then
    with its result waiting for the queue, then with neither."""
    nc = await connect(nats_url, "test-sweep")
    try:
        js = nc.jetstream()
        records, sweeper = await _sweeper(js)
        queue_id = "UNCONFIRMED000000001"
        body = b"Subject: crash\r\n\r\nmid-enqueue\r\n"
        dispatched = time.time() - 2 * DISPATCH_GRACE
        where = await store_body(js, queue_id, io.BytesIO(body), len(body))
        record = _record(queue_id, dispatched, len(body), body_store=where)
        mark_dispatched(record, ["r@example.com"], dispatched)
        revision = await records.create(record)
        assert revision
        # While its job waits in JetStream (delivery is only slow), nothing happens.
        await publish_jobs(
            AtomicBatches(js, DISPATCH_STREAM),
            TableFollower().table,
            record,
            ["r@example.com"],
            revision,
        )
        with_job, _ = await sweeper.sweep()
        jobs_with_job = (await js.stream_info(DISPATCH_STREAM)).state.messages
        # Delivered and acknowledged (the job purged), its result not yet read: work in flight.
        await js.purge_stream(DISPATCH_STREAM, subject=dispatch_subject(queue_id))
        await js.publish(outcome_subject(queue_id), b"{}", stream=OUTCOMES_STREAM)
        with_result, _ = await sweeper.sweep()
        # The job never published (the queue died after storing the record): dispatched again.
        await js.purge_stream(OUTCOMES_STREAM)
        without_job, _ = await sweeper.sweep()
        found = await records.get(queue_id, fresh=True)
        assert found is not None
        history = await _history_of(js, queue_id)
        return with_job, jobs_with_job, with_result, without_job, found[0].dispatches, history
    finally:
        await disconnect(nc)


def test_a_dispatch_whose_job_was_never_published_is_redone_before_its_lease(
    nats_server: NatsServer,
) -> None:
    with_job, jobs_with_job, with_result, without_job, dispatches, history = asyncio.run(
        _sweep_after_a_crash_mid_enqueue(nats_server.url)
    )
    assert (with_job, jobs_with_job) == (0, 1)
    assert with_result == 0
    assert (without_job, dispatches) == (1, 2)
    # The repair is in the message's history: the dispatch, and the sweeper's why.
    assert [event for event, _ in history] == ["dispatched", "swept"]
    (_, dispatched), (_, swept) = history
    assert (dispatched["attempt"], dispatched["recipients"]) == ("2", "r@example.com")
    assert swept["action"] == "re-dispatched"
    assert swept["reason"] == "JetStream held no job and no result of dispatch 1"


async def _sweep_with_an_earlier_releases_job(
    nats_url: str, stream: str, subject: Callable[[str], str]
) -> int:
    """A dispatch two graces old whose job an earlier release's queue stored."""
    nc = await connect(nats_url, "test-sweep-earlier")
    try:
        js = nc.jetstream()
        records, sweeper = await _sweeper(js)
        queue_id = "EARLIERJOB0000000001"
        body = b"Subject: earlier\r\n\r\njob\r\n"
        dispatched = time.time() - 2 * DISPATCH_GRACE
        record = _record(queue_id, dispatched, len(body), body_store="record", body=body)
        mark_dispatched(record, ["r@example.com"], dispatched)
        assert await records.create(record)
        await js.publish(subject(queue_id), b"{}", stream=stream)
        redispatched, _ = await sweeper.sweep()
        return redispatched
    finally:
        await disconnect(nc)


@pytest.mark.parametrize("earlier", EARLIER_JOBS, ids=[stream for stream, _ in EARLIER_JOBS])
def test_a_job_an_earlier_releases_queue_stored_is_work_in_flight(
    nats_server: NatsServer, earlier: tuple[str, Callable[[str], str]]
) -> None:
    """During an upgrade delivery takes those jobs too: the sweeper must not dispatch
    such a message again as if JetStream held no job for it."""
    stream, subject = earlier
    assert asyncio.run(_sweep_with_an_earlier_releases_job(nats_server.url, stream, subject)) == 0


async def _sweep_records_without_bodies(
    nats_url: str,
) -> tuple[int, list[str], int, list[tuple[str, dict[str, str]]]]:
    """Two records whose bodies are gone: one dispatched long ago without a job, one overdue."""
    nc = await connect(nats_url, "test-sweep-bodiless")
    try:
        js = nc.jetstream()
        records, sweeper = await _sweeper(js)
        dispatched = time.time() - 2 * DISPATCH_GRACE
        for queue_id, lease_ends in (
            ("BODILESS000000000001", dispatched + JOB_LEASE),  # its job never went out
            ("BODILESS000000000002", time.time() - 3600),  # its lease ran out long ago
        ):
            record = _record(queue_id, dispatched, 10)
            mark_dispatched(record, ["r@example.com"], dispatched)
            record.recipients[0].next_attempt = lease_ends
            assert await records.create(record)
        redispatched, _ = await sweeper.sweep()
        left = [r.queue_id async for r in records.all()]
        jobs = (await js.stream_info(DISPATCH_STREAM)).state.messages
        return redispatched, left, jobs, await _history_of(js, "BODILESS000000000002")
    finally:
        await disconnect(nc)


def test_a_record_whose_body_is_gone_is_removed_not_dispatched(nats_server: NatsServer) -> None:
    # A live record always has its body, so one without was never accepted (its
    # client heard 451): dispatching it would only have delivery drop it, every lease.
    redispatched, left, jobs, history = asyncio.run(_sweep_records_without_bodies(nats_server.url))
    assert (redispatched, left, jobs) == (0, [], 0)
    assert history == [
        ("swept", {"action": "removed", "reason": "its body is gone: it was never accepted"})
    ]


async def _sweep_orphaned_bodies(nats_url: str) -> tuple[int, int, list[str], list[str]]:
    nc = await connect(nats_url, "test-sweep-bodies")
    try:
        js = nc.jetstream()
        records, sweeper = await _sweeper(js)
        small = b"Subject: b\r\n\r\nbody\r\n"
        large = b"Subject: b\r\n\r\n" + b"x" * (INLINE_BODY_LIMIT + 1)
        stored: dict[str, BodyStore] = {}
        for queue_id, body in (
            ("ORPHANBODY0000000001", small),
            ("LIVEBODY000000000001", small),
            ("ORPHANOBJECT00000001", large),
            ("LIVEOBJECT0000000001", large),
        ):
            stored[queue_id] = await store_body(js, queue_id, io.BytesIO(body), len(body))
        assert stored["LIVEOBJECT0000000001"] == "object"
        for queue_id in ("LIVEBODY000000000001", "LIVEOBJECT0000000001"):
            # Held: nothing else for the sweeper to do with it.
            live = _record(queue_id, time.time(), 1, body_store=stored[queue_id], held=True)
            assert await records.create(live)
        # Now, every body is too young to judge; later, only the orphans go.
        _, removed_young = await sweeper.sweep()
        _, removed_old = await sweeper.sweep(now=time.time() + 2 * DISPATCH_GRACE)
        info = await js.stream_info(BODIES_STREAM, subjects_filter=body_subject("*"))
        objects = await stored_objects(js)
        return removed_young, removed_old, sorted(info.state.subjects or {}), sorted(objects)
    finally:
        await disconnect(nc)


def test_a_body_no_record_refers_to_is_removed_once_old_enough(nats_server: NatsServer) -> None:
    # What a crash between a record's removal and its body's purge (or a nats-server
    # SIGKILL before it persisted the purge) leaves behind, small or large.
    removed_young, removed_old, subjects, objects = asyncio.run(
        _sweep_orphaned_bodies(nats_server.url)
    )
    assert (removed_young, removed_old) == (0, 2)
    assert subjects == [body_subject("LIVEBODY000000000001")]
    assert objects == ["LIVEOBJECT0000000001"]


async def _read_through_a_lagging_replica(nats_url: str) -> tuple[bool, bool]:
    """A record read where the direct read misses it, as a lagging replica would."""
    nc = await connect(nats_url, "test-lagging-replica")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        # An empty bucket stands in for a replica that has not applied the record
        # yet; the real bucket is what the stream's leader holds.
        lagging = await js.create_key_value(KeyValueConfig(bucket="lagging-replica", history=1))
        leader = await js.key_value(MESSAGES_BUCKET)
        record = _record("LAGGING0000000000001", time.time(), 1)
        assert await (await RecordStore.open(js)).create(record)
        found = await RecordStore(js, lagging, leader).get(record.queue_id, fresh=True)
        missing = await RecordStore(js, lagging, leader).get("NOSUCHRECORD00000001", fresh=True)
        return found is not None and found[0].queue_id == record.queue_id, missing is None
    finally:
        await disconnect(nc)


def test_a_record_a_lagging_replica_misses_is_read_at_the_leader(nats_server: NatsServer) -> None:
    # Without this a result handled by another queue process could find no
    # record, be dropped, and the lease would deliver the message a second time.
    found, missing = asyncio.run(_read_through_a_lagging_replica(nats_server.url))
    assert found
    assert missing
