"""A delivery result the queue cannot read is terminated with a log line, once.

Not JSON, or JSON of the wrong shape: redelivering it would fail the same
way forever, so the results consumer terminates it (JetStream never sends it
again) and logs it. Results after it, on the same message's subject
included, are applied as usual. There is no metric for dropped results
(kurrier.core.metrics has none); the log line is all an operator sees.

Both streams delivery stores results into are read: the work queue, which
each acknowledgement empties, and the outcomes stream, which keeps what is
acknowledged until the queue's purge below the ack floor removes it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from kurrier.core.body_store import store_body
from kurrier.core.jetstream import (
    OUTCOMES_CONSUMER,
    OUTCOMES_STREAM,
    RESULTS_CONSUMER,
    RESULTS_STREAM,
    connect,
    disconnect,
    ensure_layout,
    outcome_subject,
    result_subject,
)
from kurrier.core.lifecycle import cancel_and_wait
from kurrier.core.message import DeliveryResult, MessageRecord, RecipientOutcome, RecipientState
from kurrier.core.records import RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.queue.acked_cleanup import AckedCleanup
from kurrier.queue.consumers import run_results
from kurrier.queue.dispatch import mark_dispatched
from kurrier.queue.manager import QueueManager
from kurrier.queue.retry_schedule import RetrySchedule
from nats.js.errors import NotFoundError

from tests.support.logs import LogCounter
from tests.support.nats import NatsServer

QUEUE_ID = "READABLE000000000001"
UNREADABLE = [
    b"not json at all",
    b"\xff\xfe\x00 not even text",
    b"",
    b"[]",
    b'{"queue_id": 5}',
    # JSON of the right shape but an outcome nobody knows.
    b'{"queue_id": "READABLE000000000001", "attempt": 1,'
    b' "outcomes": [{"address": "r@example.com", "outcome": "vanished", "reply": ""}]}',
]
LOGGED = "discarding an unreadable delivery result"


@dataclass(frozen=True)
class ResultStream:
    stream: str
    consumer: str
    subject: Callable[[str], str]
    # What the stream holds once every result is settled, before any purge.
    kept_when_settled: int


WORK_QUEUE = ResultStream(RESULTS_STREAM, RESULTS_CONSUMER, result_subject, 0)
OUTCOMES = ResultStream(OUTCOMES_STREAM, OUTCOMES_CONSUMER, outcome_subject, len(UNREADABLE) + 1)


@dataclass(frozen=True)
class Settled:
    record: MessageRecord
    stored: int
    ack_pending: int
    redelivered: int
    stored_after_cleanup: int


async def _results_consumer(nats_url: str, logged: LogCounter, where: ResultStream) -> Settled:
    nc = await connect(nats_url, "test-unreadable-results")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        records = await RecordStore.open(js)
        manager = QueueManager(js, records, TableFollower(), RetrySchedule(), "relay.test")
        body = b"Subject: x\r\n\r\nx\r\n"
        now = time.time()
        record = MessageRecord(
            queue_id=QUEUE_ID,
            mail_from="a@client.test",
            recipients=[RecipientState(address="r@example.com")],
            received_at=now,
            size=len(body),
            body_store=await store_body(js, QUEUE_ID, io.BytesIO(body), len(body)),
        )
        mark_dispatched(record, ["r@example.com"], now)
        assert await records.create(record)
        # Unreadable results on this message's subject and on others', then a good one.
        for n, data in enumerate(UNREADABLE):
            subject = where.subject(QUEUE_ID if n % 2 else f"GARBLED{n:013d}")
            await js.publish(subject, data, stream=where.stream)
        good = DeliveryResult(
            queue_id=QUEUE_ID,
            dispatch=1,
            outcomes=[
                RecipientOutcome(address="r@example.com", outcome="deferred", reply="451 4.3.0 x")
            ],
        )
        await js.publish(
            where.subject(QUEUE_ID), good.model_dump_json().encode(), stream=where.stream
        )
        consuming = asyncio.create_task(run_results(js, manager))
        try:
            deadline = time.monotonic() + 30
            while True:
                assert not consuming.done(), "the results consumer ended"
                assert logged.count <= len(UNREADABLE), "an unreadable result came back"
                found = await records.get(QUEUE_ID, fresh=True)
                with contextlib.suppress(NotFoundError):  # until the consumer is made
                    info = await js.consumer_info(where.stream, where.consumer)
                    settled = not (info.num_pending or info.num_ack_pending)
                    if found and found[0].recipients[0].status == "deferred" and settled:
                        break
                assert time.monotonic() < deadline, "the results were not all settled"
                await asyncio.sleep(0.05)
        finally:
            # A broken consumer redelivers in a tight loop, where a cancellation
            # is often lost inside nats-py's fetch: cancel_and_wait's case.
            async with asyncio.timeout(30):
                await cancel_and_wait(consuming, again_after=0.1)
        stored = (await js.stream_info(where.stream)).state.messages
        await AckedCleanup(js, where.stream, where.consumer).once()
        return Settled(
            found[0],
            stored,
            info.num_ack_pending,
            info.num_redelivered,
            (await js.stream_info(where.stream)).state.messages,
        )
    finally:
        await disconnect(nc)


@pytest.mark.parametrize("where", [WORK_QUEUE, OUTCOMES], ids=["work-queue", "outcomes"])
def test_unreadable_results_are_terminated_with_a_log_line(
    nats_server: NatsServer, where: ResultStream
) -> None:
    logged = LogCounter(LOGGED)
    logger = logging.getLogger("kurrier.queue.consumers")
    logger.addHandler(logged)
    try:
        settled = asyncio.run(_results_consumer(nats_server.url, logged, where))
    finally:
        logger.removeHandler(logged)
    # The good result after them was applied.
    [recipient] = settled.record.recipients
    assert (recipient.status, recipient.last_reply) == ("deferred", "451 4.3.0 x")
    # Each unreadable one: logged once, terminated, not redelivered; the work
    # queue loses each as it is settled, the outcomes stream all at the purge.
    assert logged.count == len(UNREADABLE)
    assert (settled.ack_pending, settled.redelivered) == (0, 0)
    assert settled.stored == where.kept_when_settled
    assert settled.stored_after_cleanup == 0
