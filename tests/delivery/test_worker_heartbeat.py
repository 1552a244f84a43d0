"""A delivery slower than the job's ack_wait is not handed to a second worker.

The worker tells JetStream it is still busy (in_progress) while a transaction
runs; without that, the job would be redelivered after ack_wait and the mail
sent twice.
"""

from __future__ import annotations

import asyncio

from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    DISPATCH_STREAM,
    OUTCOMES_STREAM,
    connect,
    disconnect,
    ensure_layout,
    outcome_subject,
)
from kurrier.core.message import DeliveryResult
from kurrier.core.table_store import TableFollower
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.worker import DeliveryWorker

from tests.delivery.attempts import table
from tests.support.nats import NatsServer
from tests.support.queued import jobs_left, publish_job
from tests.support.relay import route
from tests.support.sink import Sink

# The worker heartbeats every ACK_WAIT / 3; a heartbeat held up past ACK_WAIT
# (the event loop starved on a loaded machine) would let the job go to a second
# worker, so ACK_WAIT leaves 2 s of slack for that rather than 0.67 s.
ACK_WAIT = 3.0


async def test_a_slow_delivery_keeps_its_job_and_is_sent_once(
    nats_server: NatsServer, sink: Sink
) -> None:
    # Twice ack_wait: without heartbeats the job would go out again halfway through.
    sink.behaviour.data_delay = ACK_WAIT * 2
    nc = await connect(nats_server.url, "test-heartbeat")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        body = b"Subject: slow\r\n\r\nslow hop\r\n"
        queue_id = "SLOWHOP000000001"
        await publish_job(js, queue_id, body)

        tables = TableFollower()
        tables.table = table(route("r", ["example.com"], sink.port))
        worker = DeliveryWorker(
            js,
            tables,
            DeliverySettings(helo_name="relay.test", concurrency=4),
            ack_wait=ACK_WAIT,
            nc=nc,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        results = await js.pull_subscribe(outcome_subject("*"), stream=OUTCOMES_STREAM)
        [reported] = await results.fetch(1, timeout=30)
        stop.set()
        await asyncio.wait_for(running, timeout=30)

        result = DeliveryResult.model_validate_json(reported.data)
        assert [o.outcome for o in result.outcomes] == ["delivered"]
        # The sink took twice ack_wait; one copy arrived, the job was never redelivered.
        assert len(sink.messages) == 1
        assert await jobs_left(js) == 0
        info = await js.consumer_info(DISPATCH_STREAM, DELIVERY_CONSUMER)
        assert info.num_redelivered == 0
    finally:
        await disconnect(nc)
