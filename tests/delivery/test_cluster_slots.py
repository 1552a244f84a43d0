"""Slots shared through a real nats-server: a limit across clients, holds that expire."""

from __future__ import annotations

from kurrier.core.cluster_slots import ClusterSlots, Hold
from nats.js.kv import KeyValue


async def test_slots_hold_their_limit_across_processes_and_free_when_time_is_up(
    shaping_kv: KeyValue,
) -> None:
    now = [1000.0]
    one, other = ClusterSlots(shaping_kv, lambda: now[0]), ClusterSlots(shaping_kv, lambda: now[0])
    first = await one.try_take("site-x.connections", 2, hold_for=15)
    second = await other.try_take("site-x.connections", 2, hold_for=15)
    assert isinstance(first, Hold) and isinstance(second, Hold)
    # Full: the answer is how long until the first hold ends.
    assert await other.try_take("site-x.connections", 2, hold_for=15) == 15.0
    await one.release(first)
    third = await other.try_take("site-x.connections", 2, hold_for=15)
    assert isinstance(third, Hold)
    # A renewed hold outlives its first term; one never renewed (its process
    # killed) ends, and its slot is free for whoever asks next.
    now[0] += 10
    assert await other.renew([third], hold_for=15) == []
    now[0] += 10
    assert await one.held("site-x.connections") == 1
    assert isinstance(await one.try_take("site-x.connections", 2, hold_for=15), Hold)
