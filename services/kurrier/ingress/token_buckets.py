"""Token buckets by key (client address, identity): the message and AUTH-failure rates.

Memory stays bounded whatever the keys an attacker brings: past MAX_KEYS the
longest-idle key is forgotten, which at worst gives that key a full bucket again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

MAX_KEYS = 100_000


class TokenBuckets:
    """Each key may spend `per_minute` tokens at once, refilled at per_minute a minute."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_KEYS
    ) -> None:
        self._clock = clock
        self._max_keys = max_keys
        # key -> (tokens left, when counted); most recently used last.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _level(self, key: str, per_minute: int, now: float) -> float:
        tokens, since = self._buckets.get(key, (float(per_minute), now))
        return min(float(per_minute), tokens + (now - since) * per_minute / 60.0)

    def available(self, key: str, per_minute: int) -> bool:
        """Whether key has a token left, without spending it."""
        return self._level(key, per_minute, self._clock()) >= 1.0

    def take(self, key: str, per_minute: int) -> bool:
        """Spend one token of key's bucket; False (and nothing spent) when it is empty."""
        now = self._clock()
        tokens = self._level(key, per_minute, now)
        if tokens < 1.0:
            return False
        self._buckets[key] = (tokens - 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._buckets)
