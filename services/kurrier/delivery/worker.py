"""Delivery workers: pull jobs from JetStream, send them on, report each recipient's fate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from kurrier.core.atomic_batches import AtomicBatches
from kurrier.core.body_store import load_body
from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    DISPATCH_STREAM,
    EARLIER_JOBS,
    MESSAGES_STREAM,
    OUTCOMES_STREAM,
    RESULTS_STREAM,
    SHAPING_BUCKET,
    dispatch_subject,
    outcome_subject,
    pull_batch,
    result_subject,
    when_answered,
)
from kurrier.core.lifecycle import cancel_and_wait, unless_stopped
from kurrier.core.message import DeliveryJob, DeliveryResult, RecipientOutcome
from kurrier.core.message_store import MessageStore
from kurrier.core.records import RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.core.telemetry import (
    JOBS_DESTINATION,
    RESULTS_DESTINATION,
    annotate,
    publishing,
    traced_processing,
)
from kurrier.core.wire_intake import read_wire
from kurrier.delivery.completion import finish_delivered
from kurrier.delivery.courier import Courier, HeldOutcome
from kurrier.delivery.job_feed import JobFeed
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.site_shaping import SiteShaping
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

# A job not acknowledged within ACK_WAIT goes to another worker; a worker busy
# with a slow transaction says so every ACK_WAIT / 3 (msg.in_progress()). An
# existing consumer keeps the ack_wait it was created with.
ACK_WAIT = 30.0
# How long after its dispatch a job held back by traffic shaping may still be
# given back to JetStream to come again, counting no attempt; past this its
# recipients are deferred like any temporary failure. Well within the queue's
# JOB_LEASE, which must not run out while the job waits in the stream.
HOLD_BUDGET = 300.0
# A job older than this when JetStream first gives it may be one a power cut
# brought back: on one node the jobs stream and its consumer's state are not
# synced per write (unsynced_jobs, core/jetstream.py) and return from disk as
# they were at moments apart, so a job delivered and finished can come again as
# new. Its record says whether it is. Well above a job's wait for a free slot
# without a backlog, well below a machine's restart.
STALE_JOB = 10.0


def free_slots(concurrency: int, transactions: int, recordings: int) -> int:
    """How many more jobs to take: one per transaction slot, and none while more
    sent attempts wait to be recorded than transactions may run.

    Recording stalls when JetStream does (a stream electing its leader);
    taking jobs regardless would pile up messages sent but not recorded,
    each sent again if delivery crashed before recording it.
    """
    if recordings > concurrency:
        return 0
    return concurrency - transactions


class DeliveryWorker:
    def __init__(
        self,
        js: JetStreamContext,
        tables: TableFollower,
        settings: DeliverySettings,
        ack_wait: float = ACK_WAIT,
        stale_after: float = STALE_JOB,
        shaping: Callable[[KeyValue], SiteShaping] = SiteShaping,
        *,
        nc: NATS,
    ) -> None:
        self._js = js
        self._nc = nc
        self._shaping = shaping
        self._ack_wait = ack_wait
        self._stale_after = stale_after
        self._tables = tables
        self._settings = settings
        self.courier = Courier(settings)
        # Each job being handled, by the task handling it: its transaction
        # takes one of the concurrency's slots.
        self._in_flight: dict[asyncio.Task[None], Msg] = {}
        # Jobs whose attempt is over, by the task recording it and then
        # acknowledging the job (_hand_over): they take no slot.
        self._handing_over: dict[asyncio.Task[None], Msg] = {}
        self._store: MessageStore | None = None
        self._stopping = asyncio.Event()
        self._feed = JobFeed(
            nc,
            DISPATCH_STREAM,
            DELIVERY_CONSUMER,
            self._room,
            self._start,
            settings.concurrency,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Pull jobs while free slots remain; on stop, finish what is in flight."""
        earlier_jobs = await unless_stopped(
            stop, when_answered(self._subscribe, f"the {DELIVERY_CONSUMER} consumers")
        )
        if earlier_jobs is None:
            return
        shaping = self.courier.shaping
        assert shaping is not None  # _subscribe made it
        heartbeat = asyncio.create_task(self._heartbeat())
        renewal = asyncio.create_task(shaping.run_renewal())
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: self._feed.stop())
        takers = [
            asyncio.create_task(self._feed.run()),
            # Earlier releases' jobs one at a time: pulls for free slots side by
            # side could each take up to the concurrency.
            *(asyncio.create_task(self._take(jobs, 1, stop, stopping)) for jobs in earlier_jobs),
        ]
        try:
            await asyncio.gather(*takers)
        finally:
            # One that failed must not leave the other taking jobs nobody drains.
            await cancel_and_wait(*takers)
            stopping.cancel()
            self._stopping.set()
            if self._in_flight or self._handing_over:
                log.info(
                    "taking no more jobs; finishing the %d in flight, recording %d finished",
                    len(self._in_flight),
                    len(self._handing_over),
                )
            if self._in_flight:
                await asyncio.wait(self._in_flight)
            if self._handing_over:
                await asyncio.wait(self._handing_over)
            await self.courier.pool.close_idle(everything=True)
            heartbeat.cancel()
            renewal.cancel()

    def _room(self) -> int:
        return free_slots(self._settings.concurrency, len(self._in_flight), len(self._handing_over))

    def _start(self, message: Msg) -> None:
        handling = self._handle(message)
        task = asyncio.create_task(
            traced_processing(JOBS_DESTINATION, message.subject, message.headers, handling)
        )
        self._in_flight[task] = message
        task.add_done_callback(self._transaction_over)

    def _transaction_over(self, task: asyncio.Task[None]) -> None:
        del self._in_flight[task]
        self._feed.room_freed()

    def _recorded(self, task: asyncio.Task[None]) -> None:
        del self._handing_over[task]
        self._feed.room_freed()

    async def _take(
        self,
        subscription: JetStreamContext.PullSubscription,
        most: int,
        stop: asyncio.Event,
        stopping: asyncio.Task[bool],
    ) -> None:
        """Pull up to `most` jobs at a time from one consumer while slots are free."""
        while not stop.is_set():
            free = min(most, self._room())
            if free <= 0:
                # Or for the stop: the drain starts then, not when a slow
                # next hop next finishes a transaction.
                await asyncio.wait(
                    [*self._in_flight, *self._handing_over, stopping],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                continue
            for message in await pull_batch(subscription, batch=free, timeout=1):
                self._start(message)

    async def _subscribe(self) -> list[JetStreamContext.PullSubscription]:
        """Make sure the jobs stream's consumer (the feed's) exists, and subscribe to
        those of the streams where earlier releases' queues put their jobs
        (EARLIER_JOBS): delivery rolls first in an upgrade (docs/deploy.md), so
        it takes the jobs of both releases' queues. An earlier release's
        delivery processes share those consumers."""
        removals = AtomicBatches(
            self._js, MESSAGES_STREAM, self._settings.atomic_batch_min, self._nc
        )
        self._store = MessageStore(self._js, await RecordStore.open(self._js, removals))
        self.courier.shaping = self._shaping(await self._js.key_value(SHAPING_BUCKET))
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._ack_wait,
            max_deliver=-1,
            max_ack_pending=max(1000, self._settings.concurrency * 4),
        )
        try:
            await self._js.consumer_info(DISPATCH_STREAM, DELIVERY_CONSUMER)
        except NotFoundError:
            # One that exists keeps the config it was created with.
            jobs = replace(
                config, durable_name=DELIVERY_CONSUMER, filter_subject=dispatch_subject("*")
            )
            await self._js.add_consumer(DISPATCH_STREAM, jobs)
        return [
            await self._js.pull_subscribe(
                subject("*"), durable=DELIVERY_CONSUMER, stream=stream, config=config
            )
            for stream, subject in EARLIER_JOBS
        ]

    async def _heartbeat(self) -> None:
        """Tell JetStream every job in flight is still being worked on.

        One loop for all jobs rather than a timer task per job: at hundreds of
        jobs a second the per-job task cost more than the heartbeats it sent.
        """
        while True:
            await asyncio.sleep(self._ack_wait / 3)
            held = [*self._in_flight.values(), *self._handing_over.values(), *self._feed.backlog]
            for message in held:
                # A job finishing meanwhile makes its heartbeat fail: harmless.
                with contextlib.suppress(Exception):
                    await message.in_progress()

    async def _handle(self, message: Msg) -> None:
        job = await read_wire(message, DeliveryJob, log, "delivery job", self._ack_wait)
        if job is None:
            return
        annotate(job.queue_id, attempt=job.dispatch)
        if self._may_have_been_sent(message) and await self._finished(job):
            log.info(
                "job given again or late for a finished message; not sent again",
                extra={"queue_id": job.queue_id},
            )
            await message.ack()
            return
        try:
            try:
                body = await load_body(self._js, job)
            except NotFoundError:
                log.warning("body gone (message deleted)", extra={"queue_id": job.queue_id})
                await message.ack()
                return
            outcomes = await self.courier.deliver(job, body, self._tables.table)
        except Exception:
            # NATS trouble before anything was sent: leave the job to be redelivered.
            log.exception("delivery attempt failed", extra={"queue_id": job.queue_id})
            with contextlib.suppress(Exception):
                await message.nak(delay=5)
            return
        if await self._held_back(job, message, outcomes):
            return
        # The transaction is over: its slot goes to the next job while the
        # attempt is recorded (the record's removal or the result, the job's
        # acknowledgement, a larger body's removal). Held through that, every
        # slot can end up waiting on JetStream while jobs queue behind them.
        handing_over = asyncio.create_task(self._hand_over(job, message, outcomes))
        self._handing_over[handing_over] = message
        handing_over.add_done_callback(self._recorded)

    async def _held_back(
        self, job: DeliveryJob, message: Msg, outcomes: list[RecipientOutcome]
    ) -> bool:
        """Give a job that traffic shaping held back entirely to JetStream to come
        again later: nothing was sent or refused, so no attempt is counted."""
        waits = [o.retry_in for o in outcomes if isinstance(o, HeldOutcome)]
        if not outcomes or len(waits) < len(outcomes):
            return False
        retry_in = max(waits)
        if time.time() - message.metadata.timestamp.timestamp() + retry_in > HOLD_BUDGET:
            return False
        log.info(
            "held back by traffic shaping, again in %.0fs: %s",
            retry_in,
            outcomes[0].reply,
            extra={"queue_id": job.queue_id},
        )
        try:
            await message.nak(delay=retry_in)
        except Exception as error:
            # Unanswered, the job comes again after its ack wait anyway.
            log.warning("could not give a held job back: %r", error)
        return True

    def _may_have_been_sent(self, message: Msg) -> bool:
        """A job JetStream gives again, or first gives when older than stale_after.

        A job given again: its first taker may have sent it and lost the
        acknowledgement (an ack is not confirmed, and one sent while a stream
        elects its leader is lost). An old one: see STALE_JOB. Checking every
        job would cost a record read per message.
        """
        metadata = message.metadata
        if metadata.num_delivered > 1:
            return True
        return time.time() - metadata.timestamp.timestamp() > self._stale_after

    async def _finished(self, job: DeliveryJob) -> bool:
        """Whether the job's message has no record any more (delivered, bounced or deleted).

        Asked of a job that may have been sent (_may_have_been_sent): a body
        inside the job would otherwise go out again. When the record cannot
        be read, the job is sent: a duplicate rather than a loss.
        """
        assert self._store is not None  # run() opened it before taking jobs
        try:
            return await self._store.records.get(job.queue_id, fresh=True) is None
        except Exception as error:
            log.warning(
                "could not read the record of a job given again: %r",
                error,
                extra={"queue_id": job.queue_id},
            )
            return False

    async def _hand_over(
        self, job: DeliveryJob, message: Msg, outcomes: list[RecipientOutcome]
    ) -> None:
        """Record what the attempt did, then acknowledge the job; retried in place.

        The message has gone out, so giving the job back would send it again.
        While a stream elects its leader (a NATS node restarted, a partition
        healed) removing the record or storing the result fails for seconds:
        the heartbeat keeps the job meanwhile. Only when the worker stops is
        the job given back, to be sent again by whoever takes it.
        """
        assert self._store is not None  # run() opened it before taking jobs
        retry_in = 0.2
        while True:
            try:
                if not await finish_delivered(self._store, job, outcomes, message.ack):
                    await self._report(job, message.metadata.sequence.stream, outcomes)
                    await message.ack()
                return
            except Exception as error:
                if self._stopping.is_set():
                    log.warning(
                        "stopping before the attempt was recorded; it will be sent again: %r",
                        error,
                        extra={"queue_id": job.queue_id},
                    )
                    with contextlib.suppress(Exception):
                        await message.nak()
                    return
                log.warning(
                    "could not record the attempt yet, trying again in %.1fs: %r",
                    retry_in,
                    error,
                    extra={"queue_id": job.queue_id},
                )
            # A back-off between tries, not a wait for something to happen.
            await asyncio.sleep(retry_in)
            retry_in = min(retry_in * 2, 5.0)

    async def _report(
        self, job: DeliveryJob, job_sequence: int, outcomes: list[RecipientOutcome]
    ) -> None:
        """Hand the attempt's outcomes to the queue (stored, before the job is acked).

        Deduplicated per job (its stream sequence): a redelivered job reports
        once, while the jobs of one dispatch (one per route) each report.
        """
        result = DeliveryResult(
            queue_id=job.queue_id, dispatch=job.dispatch, outcomes=outcomes
        ).in_oldest_format()
        if job.batched_results:
            subject, stream = outcome_subject(job.queue_id), OUTCOMES_STREAM
        else:
            subject, stream = result_subject(job.queue_id), RESULTS_STREAM
        with publishing(
            RESULTS_DESTINATION,
            subject,
            {"Nats-Msg-Id": f"result:{job.queue_id}:{job.dispatch}:{job_sequence}"},
            queue_id=job.queue_id,
            attempt=job.dispatch,
        ) as headers:
            await self._js.publish(
                subject, result.model_dump_json().encode(), stream=stream, headers=headers
            )
