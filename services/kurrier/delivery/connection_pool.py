"""Open SMTP sessions per destination: reused across messages, capped per destination.

The cap counts every open session (busy or idle), so a destination never sees
more than the route's maxConnections connections from this process. Whoever
opens sessions is told when each one is closed (a cluster-wide connection
slot it holds is then free), and may ask for a shorter idle time for a session:
one holding a slot another delivery process may be waiting for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kurrier.delivery.smtp_client import SmtpSession, SmtpTemporaryError

# Postfix's smtp_connection_reuse_count_limit spirit: recycle long-lived sessions.
MAX_TRANSACTIONS_PER_SESSION = 100
IDLE_TIMEOUT = 5.0
REAPER_TICK = 0.5

Opener = Callable[[], Awaitable[SmtpSession]]
Closed = Callable[[SmtpSession], Awaitable[None]]


@dataclass
class _Destination:
    limit: int
    open: int = 0
    # (until when it may stay idle, session)
    idle: list[tuple[float, SmtpSession]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class ConnectionPool:
    def __init__(self, closed: Closed | None = None) -> None:
        self._destinations: dict[str, _Destination] = {}
        self._closed = closed

    def _destination(self, key: str, limit: int) -> _Destination:
        destination = self._destinations.get(key)
        if destination is None:
            destination = self._destinations[key] = _Destination(limit)
        destination.limit = limit  # follows route changes
        return destination

    async def acquire(self, key: str, limit: int, opener: Opener) -> SmtpSession:
        destination = self._destination(key, limit)
        async with destination.changed:
            while not destination.idle and destination.open >= destination.limit:
                await destination.changed.wait()
            if destination.idle:
                return destination.idle.pop()[1]
            destination.open += 1
        try:
            return await opener()
        except BaseException:
            async with destination.changed:
                destination.open -= 1
                destination.changed.notify()
            raise

    async def release(
        self, key: str, session: SmtpSession, reusable: bool, idle_for: float = IDLE_TIMEOUT
    ) -> None:
        destination = self._destinations[key]
        if reusable and session.transactions < MAX_TRANSACTIONS_PER_SESSION:
            async with destination.changed:
                destination.idle.append((time.monotonic() + idle_for, session))
                destination.changed.notify()
            return
        await self._close(destination, session)

    async def _close(self, destination: _Destination, session: SmtpSession) -> None:
        try:
            await session.quit()
        except SmtpTemporaryError:
            session.abort()
        if self._closed is not None:
            await self._closed(session)
        async with destination.changed:
            destination.open -= 1
            destination.changed.notify()

    async def close_idle(self, everything: bool = False) -> None:
        """Close the sessions idle for longer than they may be (every idle one: everything)."""
        now = time.monotonic()
        for destination in self._destinations.values():
            async with destination.changed:
                stale = [s for t, s in destination.idle if everything or t <= now]
                destination.idle = [
                    (t, s) for t, s in destination.idle if not everything and t > now
                ]
            for session in stale:
                await self._close(destination, session)

    async def run_reaper(self) -> None:
        while True:
            await asyncio.sleep(REAPER_TICK)
            await self.close_idle()
