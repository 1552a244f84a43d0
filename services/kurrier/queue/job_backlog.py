"""How many delivery jobs wait, which decides whether a new body may stay in its record.

A body kept in its record (core/body_store.py) is read by every pass over the
records, the sweeper's round and the depth gauge's refresh, for as long as its
message waits for its first attempt. While delivery keeps up those are the few
messages in flight; when jobs pile up (a next hop slower than the mail coming
in, a site held back by traffic shaping) new bodies are stored on their own, as
those of deferred messages are, and the passes read records of a few kilobytes,
not a backlog's bodies.
"""

from __future__ import annotations

import logging

from kurrier.core.jetstream import DELIVERY_CONSUMER, DISPATCH_STREAM
from kurrier.core.rounds import in_rounds
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

log = logging.getLogger(__name__)

# Jobs waiting for delivery or being delivered, at or past which new bodies are
# stored on their own: at most this many bodies (with what comes in between two
# measurements) are in records that a pass reads.
WAITING_LIMIT = 1000
MEASURE_INTERVAL = 2.0


class JobBacklog:
    def __init__(self, js: JetStreamContext, interval: float = MEASURE_INTERVAL) -> None:
        self._js = js
        self._interval = interval
        self.waiting = 0

    async def run(self) -> None:
        await in_rounds(self._interval, self.measure, "measuring the jobs waiting", log)

    async def measure(self) -> None:
        try:
            info = await self._js.consumer_info(DISPATCH_STREAM, DELIVERY_CONSUMER)
        except NotFoundError:
            self.waiting = 0  # no delivery worker has asked for a job yet
            return
        self.waiting = (info.num_pending or 0) + (info.num_ack_pending or 0)

    def small(self) -> bool:
        """Whether a new message's body may stay in its record."""
        return self.waiting < WAITING_LIMIT
