"""Open SMTP sessions per destination: reused across messages, capped per destination.

The cap counts every open session (busy or idle), so a destination never sees
more than the route's maxConnections connections from this process.
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

Opener = Callable[[], Awaitable[SmtpSession]]


@dataclass
class _Destination:
    limit: int
    open: int = 0
    idle: list[tuple[float, SmtpSession]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class ConnectionPool:
    def __init__(self) -> None:
        self._destinations: dict[str, _Destination] = {}

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

    async def release(self, key: str, session: SmtpSession, reusable: bool) -> None:
        destination = self._destinations[key]
        if reusable and session.transactions < MAX_TRANSACTIONS_PER_SESSION:
            async with destination.changed:
                destination.idle.append((time.monotonic(), session))
                destination.changed.notify()
            return
        await self._close(destination, session)

    async def _close(self, destination: _Destination, session: SmtpSession) -> None:
        try:
            await session.quit()
        except SmtpTemporaryError:
            session.abort()
        async with destination.changed:
            destination.open -= 1
            destination.changed.notify()

    async def close_idle(self, older_than: float = IDLE_TIMEOUT) -> None:
        """Close sessions idle for longer than older_than seconds (all, with 0)."""
        cutoff = time.monotonic() - older_than
        for destination in self._destinations.values():
            async with destination.changed:
                stale = [s for t, s in destination.idle if t <= cutoff]
                destination.idle = [(t, s) for t, s in destination.idle if t > cutoff]
            for session in stale:
                await self._close(destination, session)

    async def run_reaper(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.close_idle()
