"""The job feed against a real nats-server: jobs come as room frees and never
beyond it, and a pull request that ends (expired, refused, lost with a node or
a connection) is asked again, so no job waits for its ack wait."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from kurrier.core.jetstream import connect, disconnect, when_answered
from kurrier.delivery.job_feed import JobFeed
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from tests.support.nats import NatsCluster, NatsServer
from tests.support.processes import eventually

STREAM, CONSUMER = "FEED", "workers"
# Far beyond every wait below: a job that comes only after it was lost.
ACK_WAIT = 60.0
LOST = "asking again"


class Hands:
    """A worker's slots: room() is what is free, and a job is held until finish()."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: list[Msg] = []
        self.taken: list[bytes] = []
        self.overfull = False
        self.feed: JobFeed | None = None
        self.running: asyncio.Task[None] | None = None

    def room(self) -> int:
        return self.capacity - len(self.held)

    def start(self, message: Msg) -> None:
        self.overfull = self.overfull or self.room() <= 0
        self.held.append(message)
        self.taken.append(message.data)

    async def finish(self, count: int) -> None:
        for message in self.held[:count]:
            await message.ack()
        del self.held[:count]
        assert self.feed is not None
        self.feed.room_freed()


async def _stream(js: JetStreamContext, replicas: int = 1) -> None:
    await js.add_stream(
        StreamConfig(
            name=STREAM, subjects=["feed.>"], storage=StorageType.FILE, num_replicas=replicas
        )
    )
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=CONSUMER,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            num_replicas=replicas,
        ),
    )


@asynccontextmanager
async def _feeding(
    nc: NATS, hands: Hands, expires: float = 30.0, heartbeat: float = 0.5
) -> AsyncIterator[JobFeed]:
    feed = JobFeed(
        nc, STREAM, CONSUMER, hands.room, hands.start, hands.capacity, expires, heartbeat
    )
    hands.feed = feed
    hands.running = running = asyncio.create_task(feed.run())
    try:
        yield feed
    finally:
        feed.stop()
        await asyncio.wait_for(running, timeout=10)


async def _until_async(
    count: Callable[[], Awaitable[int]], what: str, at_least: int = 1, within: float = 15.0
) -> None:
    deadline = time.monotonic() + within
    while await count() < at_least:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _holds(hands: Hands, count: int) -> None:
    await eventually(lambda: len(hands.held) == count, 15, f"{count} job(s) held")


async def _waiting_requests(js: JetStreamContext) -> int:
    return (await js.consumer_info(STREAM, CONSUMER)).num_waiting or 0


async def _publish(js: JetStreamContext, *names: str) -> None:
    for name in names:
        await js.publish(f"feed.{name}", name.encode())


@pytest.fixture
async def feed_nats(nats_server: NatsServer) -> AsyncIterator[tuple[NATS, JetStreamContext]]:
    """A connection to the server, and its JetStream with the test's stream and consumer."""
    nc = await connect(nats_server.url, "test-job-feed")
    try:
        js = nc.jetstream()
        await _stream(js)
        yield nc, js
    finally:
        await disconnect(nc)


@pytest.fixture
def lost_lines(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], int]]:
    caplog.set_level(logging.INFO, logger="kurrier.delivery.job_feed")
    yield lambda: sum(LOST in record.getMessage() for record in caplog.records)


async def test_jobs_come_as_room_frees_and_never_beyond_it(
    feed_nats: tuple[NATS, JetStreamContext],
) -> None:
    nc, js = feed_nats
    hands = Hands(capacity=3)
    names = [f"job{index}" for index in range(8)]
    await _publish(js, *names)
    async with _feeding(nc, hands) as feed:
        await eventually(lambda: len(hands.held) == 3, 15, "the first three jobs")
        while len(hands.taken) < len(names):
            await hands.finish(1)
            await _holds(hands, min(3, len(hands.held) + len(names) - len(hands.taken)))
        assert not feed.backlog
    assert sorted(hands.taken) == sorted(name.encode() for name in names)
    assert not hands.overfull


async def test_jobs_beyond_the_room_wait_in_the_backlog(
    feed_nats: tuple[NATS, JetStreamContext],
) -> None:
    """Room shrinks after the feed asked (another loop took slots): what comes
    beyond it waits, and starts once room frees."""
    nc, js = feed_nats
    hands = Hands(capacity=4)
    async with _feeding(nc, hands) as feed:
        await _until_async(lambda: _waiting_requests(js), "the feed to ask")
        hands.capacity = 1
        await _publish(js, "a", "b", "c", "d")
        await eventually(lambda: len(feed.backlog) == 3, 15, "three jobs in the backlog")
        assert len(hands.held) == 1
        hands.capacity = 4
        feed.room_freed()
        assert len(hands.held) == 4 and not feed.backlog
    assert not hands.overfull


async def test_an_expired_request_is_asked_again_at_once(
    feed_nats: tuple[NATS, JetStreamContext], lost_lines: Callable[[], int]
) -> None:
    """The 408 that ends an expired request says how much of it went unused, so
    the feed asks again without waiting for its heartbeats to fall silent."""
    nc, js = feed_nats
    hands = Hands(capacity=3)
    async with _feeding(nc, hands, expires=1.0, heartbeat=0.5):
        await _publish(js, "early")
        await eventually(lambda: len(hands.taken) == 1, 15, "the first job")
        # The scenario itself: time passes over two expiries of the open request.
        await asyncio.sleep(2.5)
        await _publish(js, "late")
        await eventually(lambda: len(hands.taken) == 2, 15, "a job after the expiries")
    assert lost_lines() == 0


async def test_a_request_ended_by_the_server_is_asked_again(
    feed_nats: tuple[NATS, JetStreamContext], lost_lines: Callable[[], int]
) -> None:
    """A consumer deleted and made again ends the open requests with a 409 that
    counts nothing: the feed starts its count over."""
    nc, js = feed_nats
    hands = Hands(capacity=3)
    async with _feeding(nc, hands):
        await _until_async(lambda: _waiting_requests(js), "the feed to ask")
        await js.delete_consumer(STREAM, CONSUMER)
        await js.add_consumer(
            STREAM,
            ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT),
        )
        await _publish(js, "after")
        await eventually(lambda: len(hands.taken) == 1, 15, "the job after the new consumer")
    assert lost_lines() == 0


async def test_requests_lost_with_a_crashed_server_are_asked_again(
    feed_nats: tuple[NATS, JetStreamContext], nats_server: NatsServer, lost_lines: Callable[[], int]
) -> None:
    nc, js = feed_nats
    hands = Hands(capacity=3)
    async with _feeding(nc, hands):
        await _until_async(lambda: _waiting_requests(js), "the feed to ask")
        reconnects = nc.stats["reconnects"]
        nats_server.stop(kill=True)  # no word to the open requests, as a crash
        nats_server.start()
        await eventually(lambda: nc.stats["reconnects"] > reconnects, 15, "the client to reconnect")
        await when_answered(lambda: _publish(js, "after"), "the stream")
        await eventually(lambda: len(hands.taken) == 1, 15, "the job after the restart")
    assert lost_lines() == 0  # the reconnect said so: no silence waited for


async def test_a_stopped_feed_leaves_its_jobs_to_the_other_workers(
    feed_nats: tuple[NATS, JetStreamContext], nats_server: NatsServer
) -> None:
    """A stopped worker's open requests must not take jobs it will not run, and
    what waited in its backlog goes back: all of it reaches the other worker
    long before an ack wait. (A job the server routes to the stopping worker
    in the instant it lets go comes to another one after its ack wait.)"""
    other_nc, js = feed_nats
    stopping_nc = await connect(nats_server.url, "test-feed-stopping")
    try:
        stopping, other = Hands(capacity=4), Hands(capacity=8)
        async with _feeding(stopping_nc, stopping) as feed:
            await _until_async(lambda: _waiting_requests(js), "the first feed to ask")
            stopping.capacity = 0
            await _publish(js, "waited")
            await eventually(lambda: len(feed.backlog) == 1, 15, "a job in the backlog")
            async with _feeding(other_nc, other):
                await _until_async(lambda: _waiting_requests(js), "both feeds to ask", at_least=2)
                feed.stop()
                assert stopping.running is not None
                await stopping.running
                # Its request, older than the other's, is still open at the
                # server (it expires in 30 s), but nobody listens to it any more.
                received = stopping_nc.stats["in_msgs"]
                await _publish(js, "after1", "after2")
                await eventually(lambda: len(other.taken) == 3, 15, "every job at the other worker")
                assert stopping_nc.stats["in_msgs"] == received
        assert sorted(other.taken) == [b"after1", b"after2", b"waited"]
        assert stopping.taken == []
    finally:
        await disconnect(stopping_nc)


async def test_a_stopped_feed_has_let_go_of_its_requests(
    feed_nats: tuple[NATS, JetStreamContext], nats_server: NatsServer
) -> None:
    """When run() returns, the server has taken the unsubscription: none of the
    stopped feed's requests still waits (consumer info leaves out those nobody
    listens to), so no job published from then on can go to them. nats-py's
    drain alone returns before that in about one stop in twenty; sixty make
    such a regression show in nearly every run."""
    _, js = feed_nats
    feed_nc = await connect(nats_server.url, "test-feed-stopping")
    try:
        for _ in range(60):
            async with _feeding(feed_nc, Hands(capacity=1)):
                await _until_async(lambda: _waiting_requests(js), "the feed to ask")
            assert await _waiting_requests(js) == 0
    finally:
        await disconnect(feed_nc)


@pytest.mark.slow
async def test_requests_lost_with_the_consumers_leader_are_asked_again(
    tmp_path: Path, lost_lines: Callable[[], int]
) -> None:
    """Three nodes, the consumer replicated: its leader dies while the feed's
    connection is elsewhere, so no reconnect and no 409 says the requests went
    with it. The heartbeats' silence does."""
    (tmp_path / "nats").mkdir()
    cluster = NatsCluster(tmp_path / "nats")
    cluster.start_all()
    nc: NATS | None = None
    try:
        admin = await connect(cluster.url(), "test-feed-admin")
        try:
            await when_answered(lambda: _stream(admin.jetstream(), replicas=3), "the cluster")
            info = await admin.jetstream().consumer_info(STREAM, CONSUMER)
            assert info.cluster is not None and info.cluster.leader
            leader = info.cluster.leader
        finally:
            await disconnect(admin)
        elsewhere = next(i for i, node in enumerate(cluster.nodes) if node.name != leader)
        nc = await connect(f"nats://127.0.0.1:{cluster.ports[elsewhere]}", "test-feed-leader")
        js = nc.jetstream()
        hands = Hands(capacity=3)
        async with _feeding(nc, hands, heartbeat=0.5):
            await _until_async(lambda: _waiting_requests(js), "the feed to ask")
            reconnects = nc.stats["reconnects"]
            cluster.kill(leader)
            await eventually(lambda: lost_lines() > 0, 30, "the feed to miss its heartbeats")
            await when_answered(lambda: _publish(js, "after"), "the stream")
            await eventually(lambda: len(hands.taken) == 1, 30, "the job after the leader's loss")
            assert nc.stats["reconnects"] == reconnects
    finally:
        if nc is not None:
            await disconnect(nc)
        cluster.stop_all()


async def test_a_heartbeat_the_server_would_refuse_is_refused_here(
    feed_nats: tuple[NATS, JetStreamContext],
) -> None:
    nc, _ = feed_nats
    with pytest.raises(ValueError, match="more than half"):
        JobFeed(nc, STREAM, CONSUMER, lambda: 1, lambda _: None, 1, expires=1.0, heartbeat=0.6)
