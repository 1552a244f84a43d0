"""Where a body lives: a small one inside its record and each job, a larger one
attached to its record until the record first changes, then in the bodies
stream, as is one larger than a record keeps (ATTACHED_BODY_LIMIT); all
survive a deferral and a restart of the queue."""

from __future__ import annotations

import asyncio
import io
import smtplib
from pathlib import Path

from kurrier.core.body_store import ATTACHED_BODY_LIMIT, load_body
from kurrier.core.jetstream import (
    BODIES_STREAM,
    DISPATCH_STREAM,
    MESSAGES_STREAM,
    RECORDS_PREFIX,
    body_subject,
    connect,
    disconnect,
    dispatch_subject,
    ensure_layout,
)
from kurrier.core.message import (
    BODY_IN_RECORD_WIRE_VERSION,
    BODY_WIRE_VERSION,
    CARRIED_BODY_LIMIT,
    DeliveryJob,
    MessageRecord,
)
from kurrier.core.records import RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.queue.admin import hold
from kurrier.queue.manager import QueueManager
from kurrier.queue.retry_schedule import RetrySchedule
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests.support.nats import NatsServer
from tests.support.processes import stop_process, wait_until
from tests.support.queued import template
from tests.support.relay import (
    ServiceRelay,
    documents,
    message_records,
    route,
    stored_bodies,
    trusting,
    wait_until_drained,
)
from tests.support.sink import Sink

# 8-bit bytes that are not UTF-8: the body must cross JSON intact.
SMALL = b"Subject: small\r\n\r\n\xe9t\xe9 \xff\r\n" + b"x" * 100 + b"\r\n"
LARGE = b"Subject: large\r\n\r\n\xe9" + (b"y" * 78 + b"\r\n") * (CARRIED_BODY_LIMIT // 80 + 1)
TOO_LARGE = b"Subject: too large\r\n\r\n" + (b"z" * 78 + b"\r\n") * (ATTACHED_BODY_LIMIT // 80 + 1)


async def _in_bodies_stream(js: JetStreamContext, queue_id: str) -> int:
    subjects = (
        await js.stream_info(BODIES_STREAM, subjects_filter=body_subject(queue_id))
    ).state.subjects or {}
    return subjects.get(body_subject(queue_id), 0)


async def _accepted(js: JetStreamContext, queue_id: str, body: bytes) -> QueueManager:
    """A queue manager that took body in as queue_id and published its first jobs."""
    await ensure_layout(js)
    manager = QueueManager(
        js, await RecordStore.open(js), TableFollower(), RetrySchedule(), "relay.test"
    )
    await manager.intake.accept(template(queue_id), io.BytesIO(body), len(body))
    await manager.store.first_jobs_sent()
    return manager


async def _accept(nats_url: str, queue_id: str, body: bytes) -> tuple[MessageRecord, bytes, int]:
    """Accept body; (its record as stored, its job as on the wire, bodies-stream messages)."""
    nc = await connect(nats_url, "test-bodies")
    try:
        js = nc.jetstream()
        manager = await _accepted(js, queue_id, body)
        found = await manager.records.get(queue_id, fresh=True)
        assert found is not None
        job = await js.get_last_msg(DISPATCH_STREAM, dispatch_subject(queue_id))
        return found[0], job.data or b"", await _in_bodies_stream(js, queue_id)
    finally:
        await disconnect(nc)


async def _stored_record(nats_url: str, queue_id: str) -> bytes:
    nc = await connect(nats_url, "test-bodies")
    try:
        stored = await nc.jetstream().get_last_msg(MESSAGES_STREAM, RECORDS_PREFIX + queue_id)
        return stored.data or b""
    finally:
        await disconnect(nc)


def test_a_small_body_is_stored_in_its_record_and_carried_by_its_job(
    nats_server: NatsServer,
) -> None:
    record, wire, in_stream = asyncio.run(_accept(nats_server.url, "SMALLBODY00000000001", SMALL))
    assert (record.body_store, record.body, in_stream) == ("record", SMALL, 0)
    job = DeliveryJob.model_validate_json(wire)
    assert (job.version, job.body_store, job.body) == (BODY_WIRE_VERSION, "record", SMALL)
    # What a pod of wire version 2 reads: a store it knows, and a version to leave alone.
    assert b'"body_store":"stream"' in wire


def test_a_larger_body_is_attached_to_its_record_and_left_there_by_its_job(
    nats_server: NatsServer,
) -> None:
    queue_id = "LARGEBODY00000000001"
    record, wire, in_stream = asyncio.run(_accept(nats_server.url, queue_id, LARGE))
    assert (record.body_store, record.body, in_stream) == ("record", LARGE, 0)
    # As it is, after the record's JSON: no base64 of it to write and read back.
    assert asyncio.run(_stored_record(nats_server.url, queue_id)).endswith(b"\x00" + LARGE)
    job = DeliveryJob.model_validate_json(wire)
    assert (job.version, job.body_store, job.body) == (BODY_IN_RECORD_WIRE_VERSION, "record", None)


def test_a_body_larger_than_a_record_keeps_goes_to_the_bodies_stream(
    nats_server: NatsServer,
) -> None:
    queue_id = "TOOLARGEBODY00000001"
    record, wire, in_stream = asyncio.run(_accept(nats_server.url, queue_id, TOO_LARGE))
    assert (record.body_store, record.body, in_stream) == ("stream", None, 1)
    job = DeliveryJob.model_validate_json(wire)
    assert (job.version, job.body_store, job.body) == (1, "stream", None)


async def _load_as_the_record_changes(nats_url: str) -> tuple[bytes, int, bytes, bool]:
    """The body a job that leaves it in the record loads: while it is attached, once a
    change stored it on its own (a hold, as any change), and once the message is gone."""
    nc = await connect(nats_url, "test-bodies")
    try:
        js = nc.jetstream()
        queue_id = "MOVEDBODY00000000001"
        manager = await _accepted(js, queue_id, LARGE)
        stored = await js.get_last_msg(DISPATCH_STREAM, dispatch_subject(queue_id))
        job = DeliveryJob.model_validate_json(stored.data or b"")
        attached = await load_body(js, job)
        held = await manager.mutate(queue_id, hold)
        assert held is not None and (held.body_store, held.body) == ("stream", None)
        moved = await load_body(js, job)
        await manager.delete(queue_id)
        try:
            await load_body(js, job)
        except NotFoundError:
            gone = True
        else:
            gone = False
        return attached, await _in_bodies_stream(js, queue_id), moved, gone
    finally:
        await disconnect(nc)


def test_a_job_finds_its_body_where_the_record_put_it(nats_server: NatsServer) -> None:
    attached, in_stream_after_delete, moved, gone = asyncio.run(
        _load_as_the_record_changes(nats_server.url)
    )
    assert attached == LARGE
    assert moved == LARGE
    assert (in_stream_after_delete, gone) == (0, True)


async def _hold_with_no_room_for_the_body(nats_url: str) -> tuple[MessageRecord, bytes]:
    nc = await connect(nats_url, "test-bodies")
    try:
        js = nc.jetstream()
        queue_id = "NOROOMFORBODY0000001"
        manager = await _accepted(js, queue_id, LARGE)
        # A bodies stream capped below the body: its store is refused for want of room.
        await js.delete_stream(BODIES_STREAM)
        await ensure_layout(js, body_store_limit=1024)
        held = await manager.mutate(queue_id, hold)
        assert held is not None
        stored = await js.get_last_msg(MESSAGES_STREAM, RECORDS_PREFIX + queue_id)
        return held, stored.data or b""
    finally:
        await disconnect(nc)


def test_a_change_with_no_room_for_the_body_keeps_it_in_the_record(
    nats_server: NatsServer,
) -> None:
    held, stored = asyncio.run(_hold_with_no_room_for_the_body(nats_server.url))
    assert (held.held, held.body_store, held.body) == (True, "record", LARGE)
    assert stored.endswith(b"\x00" + LARGE)


def test_small_and_large_bodies_survive_a_deferral_and_a_queue_restart(
    tmp_path: Path, sink: Sink, nats_server: NatsServer
) -> None:
    sink.behaviour.outage_phase = "DATA"
    relay = ServiceRelay(tmp_path, nats_server.url)
    relay.publish(documents(route("r", ["example.com"], sink.port), trusting("127.0.0.0/8")))
    with relay:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as smtp:
            for body in (SMALL, LARGE):
                smtp.sendmail(
                    "a@client.test", ["r@example.com"], body, mail_options=["BODY=8BITMIME"]
                )

        records: list[MessageRecord] = []

        def deferred() -> bool:
            records[:] = message_records(nats_server.url)
            return len(records) == 2 and all(r.state == "deferred" for r in records)

        wait_until(deferred, 60, "both messages to be deferred")
        stores = sorted((r.size, r.body_store, r.body is not None) for r in records)
        # The deferral stored the large body on its own, before the record changed.
        assert [(store, carried) for _, store, carried in stores] == [
            ("record", True),
            ("stream", False),
        ]
        assert stored_bodies(nats_server.url) == 1
        stop_process(relay.processes["queue"])
        relay.start("queue")
        sink.behaviour.outage_phase = None
        delivered = sink.wait_for(2, timeout=60)
        wait_until_drained(nats_server.url, 30)
        wait_until(lambda: stored_bodies(nats_server.url) == 0, 30, "the large body's removal")
    assert sorted(m.content.endswith(SMALL) for m in delivered) == [False, True]
    assert sorted(m.content.endswith(LARGE) for m in delivered) == [False, True]


def test_with_bodies_in_records_off_a_larger_body_is_stored_on_its_own(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The setting for a roll back below wire version 6 (docs/deploy.md): the record
    keeps no body and its job is one a delivery pod of version 5 reads. No delivery
    runs, so the record and the job stay as the queue wrote them."""
    relay = ServiceRelay(tmp_path, nats_server.url, env={"KURRIER_BODIES_IN_RECORDS": "off"})
    relay.publish(documents(route("r", ["example.com"], 9), trusting("127.0.0.0/8")))
    try:
        relay.start("queue")
        relay.start("ingress")
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as smtp:
            smtp.sendmail("a@client.test", ["r@example.com"], LARGE, mail_options=["BODY=8BITMIME"])
        [record] = message_records(nats_server.url)
        assert (record.body_store, record.body) == ("stream", None)
        assert stored_bodies(nats_server.url) == 1
        wire = b""

        def first_job() -> bool:  # it follows the 250
            nonlocal wire
            wire = asyncio.run(_last_job(nats_server.url, record.queue_id))
            return bool(wire)

        wait_until(first_job, 30, "the message's first job")
        job = DeliveryJob.model_validate_json(wire)
        assert (job.body_store, job.body) == ("stream", None)
        assert job.version < BODY_IN_RECORD_WIRE_VERSION
    finally:
        relay.__exit__()


async def _last_job(nats_url: str, queue_id: str) -> bytes:
    nc = await connect(nats_url, "test-bodies")
    try:
        job = await nc.jetstream().get_last_msg(DISPATCH_STREAM, dispatch_subject(queue_id))
        return job.data or b""
    except NotFoundError:
        return b""
    finally:
        await disconnect(nc)
