"""When to try a deferred recipient again (exponential backoff with jitter), when to
warn of a delay, and when to give up (pure)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RetrySchedule:
    min_backoff: float = 300.0
    max_backoff: float = 3600.0
    max_lifetime: float = 5 * 86400.0
    jitter: float = 0.1
    # A message still queued this long gets one delay warning (0: never); the
    # age Postfix's documentation suggests for its delay_warning_time.
    delay_warning: float = 4 * 3600.0

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the given number of failed attempts (1 = first failure)."""
        base = min(self.max_backoff, self.min_backoff * 2 ** max(0, attempts - 1))
        spread = base * self.jitter
        jittered: float = base + (rng or random).uniform(-spread, spread)
        return max(0.0, jittered)

    def expired(self, received_at: float, now: float) -> bool:
        return now - received_at >= self.max_lifetime

    def under_policy(self, delay_warning: float | None) -> RetrySchedule:
        """This schedule with the RelayPolicy's delayWarningTime, when one sets it."""
        return self if delay_warning is None else replace(self, delay_warning=delay_warning)

    def warning_due(self, received_at: float, now: float) -> bool:
        return self.delay_warning > 0 and now - received_at >= self.delay_warning
