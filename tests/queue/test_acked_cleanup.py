"""Acknowledged jobs leave the jobs stream by the queue's purge below the ack floor.

(The outcomes stream's purge: tests/queue/test_unreadable_results.py.)

Against a real nats-server: the ack floor and the purge are JetStream's.
"""

from __future__ import annotations

from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    DISPATCH_STREAM,
    connect,
    disconnect,
    dispatch_subject,
    ensure_layout,
)
from kurrier.queue.acked_cleanup import AckedCleanup
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from tests.support.nats import NatsServer
from tests.support.queued import publish_job

JOBS = [f"CLEANUP00000000000{n}" for n in range(5)]


async def _stored(js: JetStreamContext) -> list[str]:
    """The queue ids of the jobs the stream holds, oldest first."""
    state = (await js.stream_info(DISPATCH_STREAM, subjects_filter=dispatch_subject("*"))).state
    if not state.messages:
        return []
    ids = []
    for seq in range(state.first_seq, state.last_seq + 1):
        try:
            stored = await js.get_msg(DISPATCH_STREAM, seq)
        except NotFoundError:
            continue
        ids.append((stored.subject or "").rsplit(".", 1)[-1])
    return ids


async def test_acknowledged_jobs_are_purged_up_to_the_first_one_still_held(
    nats_server: NatsServer,
) -> None:
    nc = await connect(nats_server.url, "test-job-cleanup")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        for queue_id in JOBS:
            await publish_job(js, queue_id)
        cleanup = AckedCleanup(js, DISPATCH_STREAM, DELIVERY_CONSUMER)
        # No delivery process has asked for a job: nothing is known to be done.
        assert await cleanup.once() == 0
        assert await _stored(js) == JOBS

        taken = await js.pull_subscribe(
            dispatch_subject("*"),
            durable=DELIVERY_CONSUMER,
            stream=DISPATCH_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=60),
        )
        jobs = await taken.fetch(len(JOBS), timeout=10)
        held = jobs[2]
        for job in jobs:
            if job is not held:
                await job.ack_sync()
        # The floor stops below the job still held: the two before it go.
        assert await cleanup.once() == 3
        assert await _stored(js) == JOBS[2:]
        assert await cleanup.once() == 0

        await held.ack_sync()
        assert await cleanup.once() == len(JOBS) + 1
        assert await _stored(js) == []
    finally:
        await disconnect(nc)
