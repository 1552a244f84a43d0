"""The queue's JetStream consumers: delivery results and due retries.

Every queue process pulls from the same durable consumers, so a result or a
due goes to whichever process asks first; each is acknowledged only once the
record reflects it. Results come from two streams, as each job asks
(DeliveryJob.batched_results): the outcomes stream, whose acknowledgements
write nothing (queue/acked_cleanup.py removes them in batches), and the work
queue, for the jobs of a queue of an earlier release or one run with
--batched-results off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from kurrier.core.jetstream import (
    DUE_CONSUMER,
    JOBS_STREAM,
    NATS_AWAY,
    OUTCOMES_CONSUMER,
    OUTCOMES_STREAM,
    RESULTS_CONSUMER,
    RESULTS_STREAM,
    outcome_subject,
    pull_batch,
    result_subject,
    when_answered,
)
from kurrier.core.message import DeliveryResult, MessageRecord
from kurrier.core.telemetry import RESULTS_DESTINATION, annotate, consuming
from kurrier.core.wire_intake import read_wire
from kurrier.queue.changes import Change
from kurrier.queue.manager import QueueManager
from kurrier.queue.results import apply_result
from kurrier.queue.retries import early_by, retry_due
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

log = logging.getLogger(__name__)

# Given the record as a change left it, in how many seconds its message should
# be delivered again instead of acknowledged (None: acknowledge).
ComeBack = Callable[[MessageRecord, float], float | None]


async def run_results(js: JetStreamContext, manager: QueueManager) -> None:
    """Consume delivery results; each is acked only once its record reflects it."""

    async def on_result(message: Msg) -> None:
        result = await read_wire(message, DeliveryResult, log, "delivery result", 30)
        if result is None:
            return
        with consuming(RESULTS_DESTINATION, message.subject, message.headers):
            annotate(result.queue_id, attempt=result.dispatch)
            change = apply_result(result, manager.schedule)
            await _settle(manager, message, result.queue_id, change)

    # A task group: one consumer failing stops the other too.
    async with asyncio.TaskGroup() as consumers:
        consumers.create_task(
            _consume(js, outcome_subject("*"), OUTCOMES_CONSUMER, OUTCOMES_STREAM, on_result)
        )
        consumers.create_task(
            _consume(js, result_subject("*"), RESULTS_CONSUMER, RESULTS_STREAM, on_result)
        )


async def run_due(js: JetStreamContext, manager: QueueManager) -> None:
    """Re-dispatch messages whose retry schedule fired (or that an admin released)."""
    change = retry_due(manager.schedule)

    async def on_due(message: Msg) -> None:
        queue_id = message.subject.rsplit(".", 1)[-1]
        await _settle(manager, message, queue_id, change, come_back=early_by)

    await _consume(js, "kurrier.due.*", DUE_CONSUMER, JOBS_STREAM, on_due)


async def _consume(
    js: JetStreamContext,
    subject: str,
    durable: str,
    stream: str,
    handle: Callable[[Msg], Awaitable[None]],
) -> None:
    subscription = await when_answered(
        lambda: js.pull_subscribe(
            subject,
            durable=durable,
            stream=stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_deliver=-1),
        ),
        f"the {durable} consumer",
    )
    while True:
        batch = await pull_batch(subscription, batch=64, timeout=5)
        # Messages about different queue ids are independent, so a batch is
        # handled concurrently: their JetStream writes and acks then share
        # round trips instead of queueing behind each other. Messages about
        # one queue id keep their order.
        by_queue_id: dict[str, list[Msg]] = {}
        for message in batch:
            by_queue_id.setdefault(message.subject.rsplit(".", 1)[-1], []).append(message)
        await asyncio.gather(*(_in_order(handle, group) for group in by_queue_id.values()))


async def _in_order(handle: Callable[[Msg], Awaitable[None]], messages: list[Msg]) -> None:
    for message in messages:
        await handle(message)


async def _settle(
    manager: QueueManager,
    message: Msg,
    queue_id: str,
    change: Change,
    come_back: ComeBack | None = None,
) -> None:
    """Apply change and ack; on failure (e.g. NATS away or full) let it come back later."""
    try:
        record = await manager.mutate(queue_id, change)
    except Exception as error:
        if isinstance(error, NATS_AWAY):
            # A node lost, a leader being elected: it heals by itself.
            log.warning(
                "could not update the record, NATS or JetStream is away; will retry: %r",
                error,
                extra={"queue_id": queue_id},
            )
        else:
            log.exception("could not update the record; will retry", extra={"queue_id": queue_id})
        with contextlib.suppress(Exception):
            await message.nak(delay=5)
        return
    delay = come_back(record, time.time()) if come_back and record else None
    if delay is not None:
        await message.nak(delay=delay)
    else:
        await message.ack()
