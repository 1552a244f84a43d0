"""Two queue processes share the results and due consumers: whichever gets a
message must act on the record as it is now, not on its own older copy.

These run two QueueManagers in one test process, each with its own NATS
connection and record cache, as two pods would have, so the interleaving
that the production shape produces by chance happens here every time.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from kurrier.core.jetstream import (
    DISPATCH_STREAM,
    JOBS_STREAM,
    connect,
    disconnect,
    dispatch_subject,
    due_subject,
    ensure_layout,
    schedule_subject,
)
from kurrier.core.lifecycle import cancel_and_wait
from kurrier.core.message import DeliveryResult, MessageRecord, RecipientOutcome, RecipientState
from kurrier.core.records import RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.queue.consumers import run_due
from kurrier.queue.manager import QueueManager
from kurrier.queue.results import apply_result
from kurrier.queue.retries import retry_due
from kurrier.queue.retry_schedule import RetrySchedule
from nats.js import JetStreamContext

from tests.support.nats import NatsServer

RECIPIENT = "r@example.com"


@asynccontextmanager
async def _queue_process(
    nats_url: str, schedule: RetrySchedule
) -> AsyncIterator[tuple[QueueManager, JetStreamContext]]:
    """What one `kurrier queue` holds: its own connection and its own record cache."""
    nc = await connect(nats_url, "test-queue-process")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        records = await RecordStore.open(js)
        yield QueueManager(js, records, TableFollower(), schedule, "relay.test"), js
    finally:
        await disconnect(nc)


def _deferral(queue_id: str, attempt: int) -> DeliveryResult:
    return DeliveryResult(
        queue_id=queue_id,
        dispatch=attempt,
        outcomes=[RecipientOutcome(address=RECIPIENT, outcome="deferred", reply="451 4.4.1 down")],
    )


async def _jobs_for(js: JetStreamContext, queue_id: str) -> int:
    info = await js.stream_info(DISPATCH_STREAM, subjects_filter=dispatch_subject(queue_id))
    return info.state.messages


async def _retry_after_another_process_deferred(nats_url: str) -> tuple[int, int, str]:
    # Deferrals due at once, so the due message finds the recipient due.
    schedule = RetrySchedule(min_backoff=0.0, max_backoff=0.0)
    async with (
        _queue_process(nats_url, schedule) as (first, js),
        _queue_process(nats_url, schedule) as (second, _),
    ):
        template = MessageRecord(
            queue_id="TWOWORKERS0000000001",
            mail_from="a@client.test",
            recipients=[RecipientState(address=RECIPIENT)],
            received_at=0.0,
            size=0,
            body_store="stream",
        )
        accepted = await first.intake.accept(template, io.BytesIO(b"Subject: x\r\n\r\nx\r\n"), 17)
        assert accepted is not None
        await first.store.first_jobs_sent()
        queue_id = accepted.queue_id
        # Attempt 1 deferred, handled by the first process; its due dispatches
        # attempt 2 in the first process too, which now holds that copy.
        await first.mutate(queue_id, apply_result(_deferral(queue_id, 1), schedule))
        await first.mutate(queue_id, retry_due(schedule))
        # Attempt 2's deferral reaches the second process instead.
        await second.mutate(queue_id, apply_result(_deferral(queue_id, 2), schedule))
        jobs_before = await _jobs_for(js, queue_id)
        # And attempt 2's due reaches the first process, whose copy predates it.
        await first.mutate(queue_id, retry_due(schedule))
        found = await first.records.get(queue_id, fresh=True)
        assert found is not None
        record = found[0]
        return record.dispatches, await _jobs_for(js, queue_id) - jobs_before, record.state


def test_a_due_retry_reaching_a_process_with_an_older_copy_is_dispatched(
    nats_server: NatsServer,
) -> None:
    dispatches, new_jobs, state = asyncio.run(
        _retry_after_another_process_deferred(nats_server.url)
    )
    assert (dispatches, new_jobs, state) == (3, 1, "active")


async def _early_due(nats_url: str) -> int:
    """A due that arrives before its recipient is due, its schedule already spent,
    as when the NATS server's clock runs ahead of the queue's."""
    schedule = RetrySchedule(min_backoff=2.0, max_backoff=2.0, jitter=0.0)
    async with _queue_process(nats_url, schedule) as (queue, js):
        template = MessageRecord(
            queue_id="EARLYDUE000000000001",
            mail_from="a@client.test",
            recipients=[RecipientState(address=RECIPIENT)],
            received_at=0.0,
            size=0,
            body_store="stream",
        )
        accepted = await queue.intake.accept(template, io.BytesIO(b"x\r\n"), 3)
        assert accepted is not None
        await queue.store.first_jobs_sent()
        queue_id = accepted.queue_id
        await queue.mutate(queue_id, apply_result(_deferral(queue_id, 1), schedule))
        await js.purge_stream(JOBS_STREAM, subject=schedule_subject(queue_id))
        await js.publish(due_subject(queue_id), b"", stream=JOBS_STREAM)
        consuming = asyncio.create_task(run_due(js, queue))
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                found = await queue.records.get(queue_id, fresh=True)
                assert found is not None
                if found[0].dispatches > 1:
                    return found[0].dispatches
                await asyncio.sleep(0.1)
            return 1
        finally:
            await cancel_and_wait(consuming)


def test_a_due_that_comes_early_brings_the_retry_back_when_due(nats_server: NatsServer) -> None:
    assert asyncio.run(_early_due(nats_server.url)) == 2


async def _delay_warnings_from_two_processes(nats_url: str) -> tuple[list[str], bool]:
    """Both processes apply the same deferral (a redelivered result) to a message past
    the warning age at once; then a later deferral comes. How many notices are stored?"""
    schedule = RetrySchedule(min_backoff=60.0, max_backoff=60.0, delay_warning=0.001)
    async with (
        _queue_process(nats_url, schedule) as (first, _),
        _queue_process(nats_url, schedule) as (second, _),
    ):
        template = MessageRecord(
            queue_id="DELAYWARN00000000001",
            mail_from="a@client.test",
            recipients=[RecipientState(address=RECIPIENT)],
            received_at=0.0,
            size=0,
            body_store="stream",
            client_trusted=True,
        )
        accepted = await first.intake.accept(template, io.BytesIO(b"Subject: x\r\n\r\nx\r\n"), 17)
        assert accepted is not None
        await first.store.first_jobs_sent()
        queue_id = accepted.queue_id
        result = apply_result(_deferral(queue_id, 1), schedule)
        await asyncio.gather(first.mutate(queue_id, result), second.mutate(queue_id, result))
        await second.mutate(queue_id, apply_result(_deferral(queue_id, 2), schedule))
        notices = [
            record.queue_id
            async for record in first.records.all()
            if record.queue_id.startswith(f"{queue_id}N")
        ]
        found = await first.records.get(queue_id, fresh=True)
        assert found is not None
        return notices, found[0].delay_warned


def test_two_processes_send_one_delay_warning(nats_server: NatsServer) -> None:
    # A notice is stored before the record moves on; the process whose write
    # loses re-applies the change to a record already marked delay_warned.
    notices, warned = asyncio.run(_delay_warnings_from_two_processes(nats_server.url))
    assert (notices, warned) == (["DELAYWARN00000000001N1"], True)
