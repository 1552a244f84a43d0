"""Pooled SMTP sessions (delivery/connection_pool.py): closed under us, and worn out.

A session kept open between jobs can be closed by the next hop (an idle
timeout, a restart) or by a middlebox between; the next job for that
destination must still go out, on a fresh session, and the dead one must not
go back into the pool. A session that carried 100 transactions (the limit
docs/architecture.md and docs/queue.md give) is closed and replaced.

The next hop is a real sink; where it must close a session, the test reaches
it through a TCP proxy that drops the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from kurrier.delivery.courier import Courier

from tests.delivery.attempts import job, message, table
from tests.support.relay import route
from tests.support.sink import Sink
from tests.support.tcp_proxy import TcpProxy

DOCUMENTED_LIMIT = 100


def _sessions(sink: Sink) -> list[int]:
    """Which session carried each message: 0 for the first the sink saw, 1 for the next..."""
    connections = [m.connection for m in sink.messages]
    return [sorted(set(connections)).index(c) for c in connections]


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_a_session_the_next_hop_closed_is_replaced_for_the_next_job(
    courier: Courier, sink: Sink
) -> None:
    with TcpProxy(sink.port) as path:
        routes = table(route("smarthost", ["*"], path.port))
        outcomes = [await courier.deliver(job(["r@dest.test"]), message("first"), routes)]
        # Idle in the pool, the session is dropped by the other end.
        path.sever()
        await _until(lambda: sink.connections_open == 0, "the next hop to see it closed")
        for subject in ("second", "third"):
            outcomes.append(await courier.deliver(job(["r@dest.test"]), message(subject), routes))
    assert [[o.outcome for o in group] for group in outcomes] == [["delivered"]] * 3
    # The second went out on a new session, which the third reused: the dead
    # session was retried once and dropped, not put back into the pool.
    assert _sessions(sink) == [0, 1, 1]


async def test_a_session_is_replaced_after_100_transactions(courier: Courier, sink: Sink) -> None:
    routes = table(route("smarthost", ["*"], sink.port))
    for n in range(DOCUMENTED_LIMIT + 2):
        [outcome] = await courier.deliver(job(["r@dest.test"]), message(f"m{n}"), routes)
        assert outcome.outcome == "delivered", outcome
    assert _sessions(sink) == [0] * DOCUMENTED_LIMIT + [1, 1]
    # The worn-out session was closed, not merely left aside.
    await _until(lambda: sink.connections_open == 1, "the first session to be closed")
