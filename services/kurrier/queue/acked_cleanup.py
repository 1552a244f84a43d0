"""Removing what a consumer has acknowledged, many messages at a time.

The jobs and outcomes streams keep what they store (limits retention), so an
acknowledgement costs no write of its own: nats-server records it in the
consumer's state, written about ten times a second. Every message at or below
the consumer's ack floor is acknowledged, so one purge up to the floor
removes all of them in one write. A message above the floor waits for the
next round (or, for a job, for the stream's age limit: core/jetstream.py)
when one below it is held longer.
"""

from __future__ import annotations

import logging

from kurrier.core.rounds import in_rounds
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

log = logging.getLogger(__name__)

CLEANUP_INTERVAL = 5.0


class AckedCleanup:
    """Purges `stream` below the ack floor of its consumer `durable`."""

    def __init__(
        self, js: JetStreamContext, stream: str, durable: str, interval: float = CLEANUP_INTERVAL
    ) -> None:
        self._js = js
        self._stream = stream
        self._durable = durable
        self._interval = interval
        self._purged_below = 0

    async def run(self) -> None:
        await in_rounds(
            self._interval, self.once, f"removing the acknowledged of {self._stream}", log
        )

    async def once(self) -> int:
        """Purge below the ack floor; returns the sequence purged up to (0: none)."""
        try:
            consumer = await self._js.consumer_info(self._stream, self._durable)
        except NotFoundError:
            return 0  # nobody has consumed from the stream yet
        below = (consumer.ack_floor.stream_seq if consumer.ack_floor else 0) + 1
        if below <= self._purged_below:
            return 0
        await self._js.purge_stream(self._stream, seq=below)
        self._purged_below = below
        return below
