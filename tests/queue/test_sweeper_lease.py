"""The sweeper's lease (queue/leadership.py): one holder at a time, and it moves on.

Three `Lease` holders, each on its own NATS connection as three queue pods
are, contend for the lease in a real nats-server. The lease's TTL (the KV
bucket's, and the refresh period derived from it) is shortened so that a
takeover takes seconds rather than a minute; everything else is as in
production. The first holder reaches NATS through a proxy the test
silences (connections open, nothing passes), so it loses NATS while it lives
and works and its refresh is never answered: it must step down before its
key can expire; the second then dies outright.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import pytest
from kurrier.core.jetstream import LEASES_BUCKET, connect, disconnect
from kurrier.core.lifecycle import cancel_and_wait
from kurrier.queue import leadership
from kurrier.queue.leadership import Lease
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from tests.support.nats import NatsServer
from tests.support.tcp_proxy import TcpProxy

LEASE = "queue-sweeper"
TTL = 3.0
# Long enough for a takeover (one TTL plus a refresh period) on a loaded machine.
DEADLINE = 10 * TTL


class Timeline:
    """Whose work runs, and whether two ever ran at once (all on the test's event loop)."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.started: list[tuple[str, float]] = []
        self.overlaps: list[tuple[str, set[str]]] = []

    def work(self, name: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def sweep_forever() -> None:
            if self.running:
                self.overlaps.append((name, set(self.running)))
            self.running.add(name)
            self.started.append((name, time.monotonic()))
            try:
                await asyncio.Event().wait()
            finally:
                self.running.discard(name)

        return sweep_forever


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def _holder(url: str, name: str, timeline: Timeline) -> AsyncIterator[asyncio.Task[None]]:
    """One queue process's lease loop, on its own connection."""
    nc = await connect(url, f"test-lease-{name}")
    try:
        kv = await nc.jetstream().key_value(LEASES_BUCKET)
        task = asyncio.create_task(Lease(kv, LEASE).run(timeline.work(name)))
        try:
            yield task
        finally:
            await cancel_and_wait(task)
    finally:
        await disconnect(nc)


async def _refreshes(kv: KeyValue, count: int) -> list[float]:
    """Return right after the lease key was written `count` more times: the seconds
    between those writes, by the server's clock."""
    watcher = await kv.watch(LEASE, include_history=False)
    written: list[datetime] = []
    try:
        async with asyncio.timeout(DEADLINE):
            async for entry in watcher:
                if entry is not None and entry.created is not None:
                    written.append(entry.created)
                if len(written) == count:
                    break
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(written)]


async def _contend(nats_url: str) -> Timeline:
    timeline = Timeline()
    observer = await connect(nats_url, "test-lease-observer")
    try:
        js = observer.jetstream()
        # The bucket as ensure_layout makes it, with the shortened TTL.
        kv = await js.create_key_value(
            KeyValueConfig(bucket=LEASES_BUCKET, storage=StorageType.FILE, history=1, ttl=TTL)
        )
        port = int(nats_url.rsplit(":", 1)[1])
        with TcpProxy(port) as path_of_a:
            async with _holder(f"nats://127.0.0.1:{path_of_a.port}", "a", timeline):
                await _until(lambda: timeline.running == {"a"}, "a to take the free lease")
                async with (
                    _holder(nats_url, "b", timeline) as b,
                    _holder(nats_url, "c", timeline) as c,
                ):
                    # Several refreshes with three contenders: a keeps it alone, and
                    # renews it before it could expire (not merely before a rival saw it).
                    gaps = await _refreshes(kv, 6)
                    assert max(gaps) < TTL, gaps
                    assert timeline.running == {"a"}
                    assert [name for name, _ in timeline.started] == ["a"]

                    # a's path to NATS goes silent right after a refresh, while it
                    # works on: its refresh waits for an answer that never comes.
                    await _refreshes(kv, 1)
                    path_of_a.silence()
                    await _until(lambda: bool(timeline.running - {"a"}), "b or c to take over")
                    assert "a" not in timeline.running, "a went on working without NATS"
                    [second] = timeline.running

                    # The new holder dies: it stops refreshing, its key stays until it expires.
                    died = time.monotonic()
                    (b if second == "b" else c).cancel()
                    await _until(
                        lambda: bool(timeline.running - {second}), "the lease to move on again"
                    )
                    third, taken = timeline.started[-1]
                    assert third in {"b", "c"} - {second}
                    # Not taken before the dead holder's key expired (refreshed at most
                    # TTL/3 before it died).
                    assert taken - died >= TTL / 2, taken - died
    finally:
        await disconnect(observer)
    return timeline


def test_one_sweeper_at_a_time_and_the_lease_moves_on(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(leadership, "LEASE_TTL", TTL)
    with caplog.at_level(logging.INFO, logger="kurrier.queue.leadership"):
        timeline = asyncio.run(_contend(nats_server.url))
    assert timeline.overlaps == []
    assert len(timeline.started) == 3
    # The holder cut off from NATS stepped down by itself, though it still lived.
    assert f"lost the {LEASE} lease" in caplog.text
    assert f"cannot confirm the {LEASE} lease" in caplog.text
