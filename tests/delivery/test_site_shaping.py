"""Traffic shaping per destination site: slots shared through real NATS, a real sink.

The slots and the pace live in the kurrier-shaping KV bucket of a real
nats-server; the site is a real SMTP sink. The courier runs in the test
process (with shorter slow-down timings), so each step is one call.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from kurrier.core.jetstream import (
    OUTCOMES_STREAM,
    connect,
    disconnect,
    ensure_layout,
    outcome_subject,
)
from kurrier.core.message import DeliveryResult
from kurrier.core.table_store import TableFollower
from kurrier.delivery.courier import Courier, HeldOutcome
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.site_shaping import Limits, SiteShaping
from kurrier.delivery.site_states import site_states
from kurrier.delivery.sites import site_of
from kurrier.delivery.worker import DeliveryWorker
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from tests.delivery.attempts import job, message, table
from tests.support.nats import NatsServer
from tests.support.queued import publish_job, store_record
from tests.support.relay import route
from tests.support.sink import Sink

SHAPED = "{maxConnections: 4, messagesPerMinute: 1000}"


async def test_a_site_answering_421_is_slowed_then_resumed_gradually(
    courier: Courier, shaping_kv: KeyValue, sink: Sink
) -> None:
    # Every reply counts at once (no gap between slow-downs, no wait before speeding up).
    courier.shaping = SiteShaping(shaping_kv, slowdown_gap=0, recovery_step=0)
    routes = table(route("throttled", ["*"], sink.port, shaping=SHAPED))
    [compiled] = routes.routes
    site = site_of(compiled, [])

    async def limits() -> Limits:
        assert courier.shaping is not None
        return await courier.shaping.limits(site, compiled)

    assert await limits() == Limits(4, 1000)
    sink.behaviour.outage_phase = "greeting"
    sink.behaviour.outage_reply = "421 4.7.0 too many connections, slow down"
    [outcome] = await courier.deliver(job(["r@dest.test"]), message("m0"), routes)
    # The next hop's answer: an attempt, deferred at the usual backoff (not held).
    assert not isinstance(outcome, HeldOutcome)
    assert outcome.outcome == "deferred"
    assert "421 4.7.0 too many connections" in outcome.reply
    assert await limits() == Limits(2, 500)
    await courier.deliver(job(["r@dest.test"]), message("m1"), routes)
    await courier.deliver(job(["r@dest.test"]), message("m2"), routes)
    # Halved each time, down to the floor: one connection, a tenth of the rate.
    assert await limits() == Limits(1, 125)
    await courier.deliver(job(["r@dest.test"]), message("m3"), routes)
    assert await limits() == Limits(1, 100)

    sink.behaviour.outage_phase = None
    seen = [await limits()]
    for n in range(12):
        [outcome] = await courier.deliver(job(["r@dest.test"]), message(f"ok{n}"), routes)
        assert outcome.outcome == "delivered"
        seen.append(await limits())
    # Additive increase: one connection and a tenth of the rate per success.
    assert seen[:4] == [Limits(1, 100), Limits(2, 200), Limits(3, 300), Limits(4, 400)]
    assert seen[-1] == Limits(4, 1000)
    with pytest.raises(KeyNotFoundError):
        await shaping_kv.get(f"{site.key}.pace")


async def test_a_throttled_try_is_an_attempt_deferred_at_the_usual_backoff(
    nats_server: NatsServer, sink: Sink
) -> None:
    """A throttling reply is the next hop's answer: the job's result is a deferral the
    queue counts (and retries at its backoff), not a job given back unrecorded."""
    sink.behaviour.outage_phase = "greeting"
    sink.behaviour.outage_reply = "421 4.7.0 slow down"
    nc = await connect(nats_server.url, "test-throttled")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        await store_record(js, "THROTTLED0000001")
        tables = TableFollower()
        tables.table = table(route("r", ["example.com"], sink.port))
        worker = DeliveryWorker(
            js, tables, DeliverySettings(helo_name="relay.test"), shaping=SiteShaping, nc=nc
        )
        await publish_job(js, "THROTTLED0000001")
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + 30
            while not (await js.stream_info(OUTCOMES_STREAM)).state.messages:
                assert time.monotonic() < deadline, "no result"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(running, timeout=30)
        results = await js.pull_subscribe(outcome_subject("*"), stream=OUTCOMES_STREAM)
        [first] = await results.fetch(1, timeout=2)
        [outcome] = DeliveryResult.model_validate_json(first.data).outcomes
        assert outcome.outcome == "deferred"
        assert "421 4.7.0 slow down" in outcome.reply
        assert sink.outage_replies == 1 and not sink.messages
    finally:
        await disconnect(nc)


async def test_a_sites_description_follows_its_route_at_once(shaping_kv: KeyValue) -> None:
    """`kurrier queue sites` shows a route's new shaping from its next message,
    not only once the site's description is due to be written again."""
    shaping = SiteShaping(shaping_kv)
    for connections in (3, 7):
        shaped = f"{{maxConnections: {connections}, messagesPerMinute: 1000}}"
        routes = table(route("described", ["*"], 2525, shaping=shaped))
        [compiled] = routes.routes
        site = site_of(compiled, [])
        await shaping.limits(site, compiled)
        [state] = await site_states(shaping_kv)
        assert state.name == site.name
        assert state.configured == Limits(connections, 1000)
