"""Pooled SMTP sessions (delivery/connection_pool.py): closed under us, and worn out.

A session kept open between jobs can be closed by the next hop (an idle
timeout, a restart) or by a middlebox between; the next job for that
destination must still go out, on a fresh session, and the dead one must not
go back into the pool. A session that carried 100 transactions (the limit
docs/architecture.md and docs/queue.md give) is closed and replaced.

A session whose connection is gone fails each command as a temporary error,
on uvloop (the services' loop) as on asyncio, and gives its place back.

The next hop is a real sink; where it must close a session, the test reaches
it through a TCP proxy that drops the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from kurrier.delivery.connection_pool import ConnectionPool
from kurrier.delivery.courier import Courier
from kurrier.delivery.smtp_client import SmtpSession, SmtpTemporaryError

from tests.delivery.attempts import job, message, table
from tests.support.relay import route
from tests.support.sink import Sink
from tests.support.smtp_client import plain_session
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


@pytest.mark.parametrize(
    "new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_a_dead_session_fails_as_temporary_and_frees_its_place(
    new_loop: Callable[[], asyncio.AbstractEventLoop], sink: Sink
) -> None:
    async def scenario(path: TcpProxy) -> None:
        def opener() -> Awaitable[SmtpSession]:
            return plain_session(path.port)

        pool = ConnectionPool()
        session = await pool.acquire("hop", 1, opener)
        path.sever()
        await _until(lambda: sink.connections_open == 0, "the next hop to see it closed")
        # The first write still goes out half-closed, the next meets the reset;
        # after that the transport is closed, which uvloop answers with a RuntimeError.
        for _ in range(3):
            with pytest.raises(SmtpTemporaryError):
                await session.command("NOOP")
        await pool.release("hop", session, reusable=False)
        async with asyncio.timeout(10):  # the only place (limit 1) is free again
            replacement = await pool.acquire("hop", 1, opener)
        assert (await replacement.command("NOOP")).code == 250
        await pool.release("hop", replacement, reusable=False)

    with TcpProxy(sink.port) as path, asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(scenario(path))
