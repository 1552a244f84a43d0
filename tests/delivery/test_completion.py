"""Delivery finishes a message itself when its job delivered all that was left of it.

Real nats-server, real SMTP sink, the real delivery worker: the queue's part
is played by its own record store and dispatch code, so each test sees what
delivery leaves behind in JetStream.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from kurrier.core.atomic_batches import AtomicBatches
from kurrier.core.body_store import body_exists, store_body
from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    DISPATCH_STREAM,
    OUTCOMES_STREAM,
    RESULTS_STREAM,
    connect,
    disconnect,
    dispatch_subject,
    ensure_layout,
    outcome_subject,
)
from kurrier.core.loader import parse_documents
from kurrier.core.message import (
    WIRE_VERSION,
    DeliveryJob,
    DeliveryResult,
    MessageRecord,
    RecipientOutcome,
    RecipientState,
)
from kurrier.core.records import RecordStore
from kurrier.core.routing import compile_table
from kurrier.core.table_store import TableFollower
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.worker import DeliveryWorker
from kurrier.queue.dispatch import mark_dispatched, publish_jobs
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tests.support.nats import NatsServer
from tests.support.queued import jobs_left
from tests.support.relay import route
from tests.support.sink import Sink

BODY = b"Subject: finish\r\n\r\nfinished by delivery\r\n"


@dataclass
class Scene:
    nc: NATS
    js: JetStreamContext
    records: RecordStore
    tables: TableFollower

    def job_writes(self) -> AtomicBatches:
        return AtomicBatches(self.js, DISPATCH_STREAM)

    async def queued(self, queue_id: str, recipients: list[str]) -> tuple[MessageRecord, int]:
        """A message as the queue's intake leaves it: body, record, then its jobs."""
        now = time.time()
        record = MessageRecord(
            queue_id=queue_id,
            mail_from="a@client.test",
            recipients=[RecipientState(address=r) for r in recipients],
            received_at=now,
            size=len(BODY),
            body_store=await store_body(self.js, queue_id, io.BytesIO(BODY), len(BODY)),
        )
        mark_dispatched(record, recipients, now)
        revision = await self.records.create(record)
        assert revision
        return record, revision

    async def jobs(self) -> list[DeliveryJob]:
        """The jobs waiting in JetStream, read without consuming them."""
        state = (await self.js.stream_info(DISPATCH_STREAM)).state
        stored = [
            await self.js.get_msg(DISPATCH_STREAM, seq)
            for seq in range(state.first_seq, state.last_seq + 1)
        ]
        return [DeliveryJob.model_validate_json(m.data or b"") for m in stored]

    async def results(self, stream: str = OUTCOMES_STREAM) -> int:
        """Results stored for the queue in stream (the outcomes stream unless asked)."""
        return (await self.js.stream_info(stream)).state.messages

    @asynccontextmanager
    async def delivering(self, worker: DeliveryWorker | None = None) -> AsyncIterator[None]:
        worker = worker or DeliveryWorker(
            self.js, self.tables, DeliverySettings(helo_name="relay.test"), nc=self.nc
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(running, timeout=30)


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + 30
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def _scene(nats_server: NatsServer, sink: Sink, *routes: str) -> AsyncIterator[Scene]:
    nc = await connect(nats_server.url, "test-completion")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        tables = TableFollower()
        documents = [yaml.safe_load(r) for r in routes or (route("r", ["example.com"], sink.port),)]
        table, problems = compile_table(parse_documents(documents, "test"))
        assert not problems
        tables.table = table
        yield Scene(nc, js, await RecordStore.open(js), tables)
    finally:
        await disconnect(nc)


async def _jobs_done(js: JetStreamContext) -> bool:
    return await jobs_left(js) == 0


async def test_a_job_that_delivers_all_that_was_left_removes_record_and_body(
    nats_server: NatsServer, sink: Sink
) -> None:
    async with _scene(nats_server, sink) as scene:
        queue_id = "FINISHED000000000001"
        record, revision = await scene.queued(queue_id, ["r1@example.com", "r2@example.com"])
        await publish_jobs(
            scene.job_writes(),
            scene.tables.table,
            record,
            [r.address for r in record.recipients],
            revision,
        )
        async with scene.delivering():
            await _until(lambda: _jobs_done(scene.js), "the job to be acked")
        assert len(sink.messages) == 1
        assert await scene.records.get(queue_id, fresh=True) is None
        assert not await body_exists(scene.js, queue_id, "stream")
        # Nothing for the queue to do: no result was stored.
        assert await scene.results() == 0
        assert await scene.results(RESULTS_STREAM) == 0


class _GatedRecording(DeliveryWorker):
    """A worker whose attempts, once sent, are recorded only when the gate opens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()

    async def _hand_over(
        self, job: DeliveryJob, message: Msg, outcomes: list[RecipientOutcome]
    ) -> None:
        await self.gate.wait()
        await super()._hand_over(job, message, outcomes)


async def _one_slot_gated(scene: Scene, ids: list[str]) -> _GatedRecording:
    """Messages queued with their jobs out, and a worker of one slot whose
    attempts are recorded only once its gate opens."""
    for queue_id in ids:
        record, revision = await scene.queued(queue_id, ["r@example.com"])
        await publish_jobs(
            scene.job_writes(), scene.tables.table, record, ["r@example.com"], revision
        )
    return _GatedRecording(
        scene.js,
        scene.tables,
        DeliverySettings(helo_name="relay.test", concurrency=1),
        nc=scene.nc,
    )


async def test_a_sent_job_frees_its_slot_before_its_attempt_is_recorded(
    nats_server: NatsServer, sink: Sink
) -> None:
    async with _scene(nats_server, sink) as scene:
        ids = ["SLOTFREED00000000001", "SLOTFREED00000000002"]
        worker = await _one_slot_gated(scene, ids)

        async def both_sent() -> bool:
            return len(sink.messages) == 2

        async with scene.delivering(worker):
            # One slot: the second message goes out while the first one's
            # record is still there, its removal not yet begun.
            await _until(both_sent, "both messages to reach the next hop")
            for queue_id in ids:
                assert await scene.records.get(queue_id, fresh=True) is not None
            worker.gate.set()
            await _until(lambda: _jobs_done(scene.js), "both jobs to be acknowledged")
        for queue_id in ids:
            assert await scene.records.get(queue_id, fresh=True) is None
        assert await scene.results() == 0


async def test_no_job_is_taken_while_more_attempts_wait_to_be_recorded_than_may_run(
    nats_server: NatsServer, sink: Sink
) -> None:
    """Recording stalls when JetStream does: jobs taken meanwhile would pile up
    sent but unrecorded, each sent again if delivery crashed. With one slot,
    one attempt may wait to be recorded while a second runs; after that the
    worker asks for nothing until a recording is done."""
    async with _scene(nats_server, sink) as scene:
        ids = [f"STALLED0000000000{index:03d}" for index in range(4)]
        worker = await _one_slot_gated(scene, ids)

        async def two_sent() -> bool:
            return len(sink.messages) == 2

        async with scene.delivering(worker):
            await _until(two_sent, "two messages to reach the next hop")
            # The second job's transaction holds the slot from its start: from
            # then on the room is nil, so no pull request may be open.
            consumer = await scene.js.consumer_info(DISPATCH_STREAM, DELIVERY_CONSUMER)
            assert (consumer.num_ack_pending, consumer.num_pending) == (2, 2)
            assert consumer.num_waiting == 0
            worker.gate.set()
            await _until(lambda: _jobs_done(scene.js), "every job to be acknowledged")
        assert len(sink.messages) == len(ids)


async def test_a_record_changed_since_dispatch_is_left_to_the_queue(
    nats_server: NatsServer, sink: Sink
) -> None:
    async with _scene(nats_server, sink) as scene:
        queue_id = "CHANGED0000000000001"
        record, revision = await scene.queued(queue_id, ["r@example.com"])
        await publish_jobs(
            scene.job_writes(), scene.tables.table, record, ["r@example.com"], revision
        )
        # An administrator holds the message while its job is out.
        record.held = True
        await scene.records.update(record, revision)
        async with scene.delivering():
            results = await scene.js.pull_subscribe(outcome_subject("*"), stream=OUTCOMES_STREAM)
            [reported] = await results.fetch(1, timeout=30)
        result = DeliveryResult.model_validate_json(reported.data)
        assert [o.outcome for o in result.outcomes] == ["delivered"]
        found = await scene.records.get(queue_id, fresh=True)
        assert found is not None and found[0].held
        assert await body_exists(scene.js, queue_id, "stream")


@pytest.mark.parametrize(
    ("batched_results", "stream", "other"),
    [(True, OUTCOMES_STREAM, RESULTS_STREAM), (False, RESULTS_STREAM, OUTCOMES_STREAM)],
    ids=["batched", "work-queue"],
)
async def test_a_message_split_across_routes_reports_each_part_to_the_queue(
    nats_server: NatsServer, sink: Sink, batched_results: bool, stream: str, other: str
) -> None:
    async with _scene(
        nats_server,
        sink,
        route("one", ["one.example"], sink.port),
        route("two", ["two.example"], sink.port),
    ) as scene:
        queue_id = "SPLIT000000000000001"
        recipients = ["a@one.example", "b@two.example"]
        record, revision = await scene.queued(queue_id, recipients)
        await publish_jobs(
            scene.job_writes(), scene.tables.table, record, recipients, revision, batched_results
        )
        assert [job.record_revision for job in await scene.jobs()] == [None, None]
        async with scene.delivering():
            await _until(lambda: _jobs_done(scene.js), "both jobs to be acked")
        assert len(sink.messages) == 2
        assert await scene.results(stream) == 2
        assert await scene.results(other) == 0
        assert await scene.records.get(queue_id, fresh=True) is not None


async def test_a_job_for_some_of_the_pending_recipients_carries_no_revision(
    nats_server: NatsServer, sink: Sink
) -> None:
    async with _scene(nats_server, sink) as scene:
        record, revision = await scene.queued("PARTIAL0000000000001", ["a@example.com"])
        # A second recipient still deferred: this job is not all that is left.
        record.recipients.append(RecipientState(address="b@example.com", status="deferred"))
        await publish_jobs(
            scene.job_writes(), scene.tables.table, record, ["a@example.com"], revision
        )
        [job] = await scene.jobs()
        assert job.record_revision is None
        assert job.received_at == record.received_at


async def test_a_job_in_a_newer_format_is_left_for_a_pod_that_reads_it(
    nats_server: NatsServer, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    # A newer queue's job during a rolling upgrade: this pod must not guess at it.
    async with _scene(nats_server, sink) as scene:
        record, _ = await scene.queued("NEWERFORMAT000000001", ["r@example.com"])
        job = DeliveryJob(
            queue_id=record.queue_id,
            dispatch=1,
            mail_from=record.mail_from,
            recipients=["r@example.com"],
            size=record.size,
            body_store=record.body_store,
            version=WIRE_VERSION + 1,
        )
        await scene.js.publish(
            dispatch_subject(record.queue_id),
            job.model_dump_json().encode(),
            stream=DISPATCH_STREAM,
        )
        with caplog.at_level(logging.WARNING, logger="kurrier.delivery.worker"):
            async with scene.delivering():

                async def left() -> bool:
                    return "newer than this pod's" in caplog.text

                await _until(left, "the worker to leave the job")
        assert sink.messages == []
        assert await scene.records.get(record.queue_id, fresh=True) is not None
        assert await jobs_left(scene.js) == 1
