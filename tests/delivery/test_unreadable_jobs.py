"""A delivery job the worker cannot read is terminated with a log line, once.

Not JSON, or JSON of the wrong shape: no pod will ever read it, so the
worker terminates it (JetStream never sends it again) and logs it, and goes
on with the jobs after it. There is no metric for dropped jobs
(kurrier.core.metrics has none); the log line is all an operator sees.
"""

from __future__ import annotations

import asyncio
import logging
import time

from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    DISPATCH_STREAM,
    connect,
    disconnect,
    dispatch_subject,
    ensure_layout,
)
from kurrier.core.table_store import TableFollower
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.worker import DeliveryWorker
from nats.js.errors import NotFoundError

from tests.delivery.attempts import table
from tests.support.logs import LogCounter
from tests.support.nats import NatsServer
from tests.support.queued import publish_job
from tests.support.relay import route
from tests.support.sink import Sink

UNREADABLE = [
    b"not json at all",
    b"\xff\xfe\x00 not even text",
    b"",
    b"[]",
    b'{"queue_id": "GARBLED0000000000001", "attempt": "first"}',
    # Every field there, but a body store that does not exist.
    b'{"queue_id": "GARBLED0000000000002", "attempt": 1, "mail_from": "a@client.test",'
    b' "recipients": ["r@example.com"], "size": 3, "body_store": "floppy"}',
]
LOGGED = "discarding an unreadable delivery job"


async def _deliver(nats_url: str, port: int, sink: Sink, logged: LogCounter) -> tuple[int, int]:
    nc = await connect(nats_url, "test-unreadable-jobs")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        for n, data in enumerate(UNREADABLE):
            await js.publish(dispatch_subject(f"GARBLED{n:013d}"), data, stream=DISPATCH_STREAM)
        body = b"Subject: readable\r\n\r\nafter the garbage\r\n"
        queue_id = "READABLE000000000001"
        await publish_job(js, queue_id, body)
        tables = TableFollower()
        tables.table = table(route("r", ["example.com"], port))
        worker = DeliveryWorker(js, tables, DeliverySettings(helo_name="relay.test"), nc=nc)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + 30
            while True:
                assert not running.done(), "the worker ended"
                assert logged.count <= len(UNREADABLE), "an unreadable job came back"
                try:
                    info = await js.consumer_info(DISPATCH_STREAM, DELIVERY_CONSUMER)
                except NotFoundError:  # not made yet
                    info = None
                settled = info is not None and not (info.num_pending or info.num_ack_pending)
                if sink.messages and settled:
                    break
                assert time.monotonic() < deadline, "the jobs were not all settled"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(running, timeout=30)
        # Every job at or below the ack floor, for the queue to purge.
        unsettled = (await js.stream_info(DISPATCH_STREAM)).state.last_seq - (
            info.ack_floor.stream_seq if info.ack_floor else 0
        )
        return unsettled, info.num_redelivered
    finally:
        await disconnect(nc)


def test_unreadable_jobs_are_terminated_with_a_log_line(
    nats_server: NatsServer, sink: Sink
) -> None:
    logged = LogCounter(LOGGED)
    logger = logging.getLogger("kurrier.delivery.worker")
    logger.addHandler(logged)
    try:
        unsettled, redelivered = asyncio.run(_deliver(nats_server.url, sink.port, sink, logged))
    finally:
        logger.removeHandler(logged)
    # The readable job after them was delivered.
    assert [m.recipients for m in sink.messages] == [("r@example.com",)]
    # Each unreadable one: logged once, terminated (below the ack floor), not redelivered.
    assert logged.count == len(UNREADABLE)
    assert (unsettled, redelivered) == (0, 0)
