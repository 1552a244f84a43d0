"""A route's sending rate limit (RelayRoute spec.rateLimit.perMinute), per delivery process.

A sliding window: at most N transactions start in any 60 seconds. A
transaction over the limit waits for its slot, up to MAX_WAIT; past that it
is deferred, so a flood for one route cannot hold every delivery slot.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

WINDOW = 60.0
MAX_WAIT = 20.0


class SendingRates:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._starts: dict[str, list[float]] = {}

    def reserve(self, key: str, per_minute: int) -> float | None:
        """Seconds to wait before sending (the slot is then taken), or None: defer instead."""
        now = self._clock()
        starts = self._starts.setdefault(key, [])
        del starts[: bisect.bisect_right(starts, now - WINDOW)]
        # Past and already promised starts both count against the window.
        at = now if len(starts) < per_minute else max(now, starts[-per_minute] + WINDOW)
        if at - now > MAX_WAIT:
            return None
        bisect.insort(starts, at)
        return at - now
