"""The shared counters (core/cluster_counters.py) on a real NATS: several "processes"
in one test, each its own object with its own holder name, clock given by the test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from kurrier.core.cluster_counters import (
    HOLD,
    LEASE,
    ClusterBuckets,
    ClusterLeases,
    CountersUnavailable,
    Rate,
    _Entries,
)
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.ingress.auth_failures import SCOPE, AuthFailures
from kurrier.ingress.connection_gate import ConnectionGate
from nats.js import JetStreamContext

from tests.support.nats import NatsServer


@pytest_asyncio.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await connect(nats_server.url, "test-counters")
    context = nc.jetstream(timeout=2)
    await ensure_layout(context)
    yield context
    await disconnect(nc)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def _buckets(js: JetStreamContext, clock: Clock) -> ClusterBuckets:
    return ClusterBuckets(await _Entries.open(js, "test-rate", 1), clock=clock)


async def _leases(js: JetStreamContext, holder: str, clock: Clock) -> ClusterLeases:
    return ClusterLeases(await _Entries.open(js, "test-held", 1), holder=holder, clock=clock)


async def _taken(buckets: ClusterBuckets, rate: Rate) -> int:
    taken = 0
    while await buckets.take("client", rate):
        taken += 1
    return taken


@pytest.mark.asyncio
async def test_processes_share_one_bucket_and_drop_what_they_held_too_long(
    js: JetStreamContext,
) -> None:
    rate = Rate(120)  # batches of up to 4 (HOLD seconds' refill)
    clock = Clock()
    a, b = await _buckets(js, clock), await _buckets(js, clock)
    assert await a.take("client", rate)  # a holds the rest of a batch of 4
    assert await _taken(b, rate) == 120 - 4, "b gets all that a does not hold"
    assert await _taken(a, rate) == 3, "and a spends what it holds: the limit, exactly"
    clock.now += 60  # full again
    assert await a.take("client", rate)  # 3 held again
    clock.now += HOLD  # HOLD seconds' refill: the batch a took
    assert await _taken(b, rate) == 120
    assert await _taken(a, rate) == 0, "held for HOLD seconds unspent: dropped, not spent"


@pytest.mark.asyncio
async def test_an_empty_bucket_is_known_without_asking_until_a_token_is_due(
    js: JetStreamContext, nats_server: NatsServer
) -> None:
    rate = Rate(6)  # a token every 10 s
    clock = Clock()
    buckets = await _buckets(js, clock)
    assert await _taken(buckets, rate) == 6
    nats_server.stop()
    assert not await buckets.take("client", rate), "refused with NATS away: nothing to ask"
    clock.now += 10
    with pytest.raises(CountersUnavailable):
        await buckets.take("client", rate)


@pytest.mark.asyncio
async def test_a_bucket_is_looked_at_without_spending_it(js: JetStreamContext) -> None:
    rate = Rate(3)  # a token every 20 s, taken one at a time
    clock = Clock()
    spender, looker = await _buckets(js, clock), await _buckets(js, clock)
    assert await looker.available("client", rate)
    assert await _taken(spender, rate) == 3
    assert not await looker.available("client", rate), "another process emptied it"
    clock.now += 20
    assert [await looker.available("client", rate) for _ in range(5)] == [True] * 5
    assert await spender.take("client", rate), "looking spent nothing"
    assert not await looker.available("client", rate), "believed full, read again"


@pytest.mark.asyncio
async def test_failed_auth_locks_a_client_out_on_every_process(
    js: JetStreamContext, nats_server: NatsServer
) -> None:
    clock = Clock()
    one = AuthFailures(ClusterBuckets(await _Entries.open(js, SCOPE, 1), clock=clock), 3)
    two = AuthFailures(ClusterBuckets(await _Entries.open(js, SCOPE, 1), clock=clock), 3)
    for _ in range(3):
        assert not await two.locked_out("192.0.2.7")
        await one.count("192.0.2.7")
    assert await two.locked_out("192.0.2.7"), "failures on one process count on the other"
    assert not await two.locked_out("192.0.2.8")
    clock.now += 20
    assert not await two.locked_out("192.0.2.7"), "a failure refilled after 20 s"
    nats_server.stop()
    await one.count("192.0.2.8")  # uncounted without NATS, and no failure of its own
    with pytest.raises(CountersUnavailable):
        await two.locked_out("192.0.2.8")


@pytest.mark.asyncio
async def test_a_share_not_refreshed_for_a_lease_is_not_counted(js: JetStreamContext) -> None:
    clock = Clock()
    gone, alive = await _leases(js, "gone", clock), await _leases(js, "alive", clock)
    assert [await gone.acquire("client", 3) for _ in range(3)] == [True, True, True]
    assert not await alive.acquire("client", 3)
    clock.now += LEASE - 1
    assert not await alive.acquire("client", 3), "the share still counts within its lease"
    clock.now += 2
    assert await alive.acquire("client", 3), "a share nobody refreshed lapsed"


@pytest.mark.asyncio
async def test_connection_gate_counts_a_client_across_processes(js: JetStreamContext) -> None:
    clock = Clock()
    one = ConnectionGate(max_total=2, clients=await _leases(js, "one", clock))
    two = ConnectionGate(max_total=2, clients=await _leases(js, "two", clock))
    assert one.admit() is None and await one.admit_client("2001:db8::1", 2) is None
    assert two.admit() is None and await two.admit_client("2001:db8::2", 2) is None
    assert await two.admit_client("2001:db8::3", 2) == (
        "421 4.7.0 Too many connections from your address, try again later"
    ), "one /64 is one client, whichever process it reaches"
    assert one.admit() is None
    assert (one.admit() or "").startswith("421 4.3.2"), "the total is per process"
    one.release_client("2001:db8::1")
    await one._clients.flush()
    assert await two.admit_client("2001:db8::3", 2) is None
    one.draining = True
    assert (one.admit() or "").startswith("421 4.3.2 Service shutting down")
