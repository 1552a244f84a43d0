"""Removing the jobs delivery has acknowledged, many at a time.

The jobs stream keeps what it stores (limits retention), so an
acknowledgement costs no write of its own: nats-server records it in the
consumer's state, written about ten times a second. Every job at or below the
consumer's ack floor is acknowledged, so one purge up to the floor removes all
of them in one write. A job above the floor waits for the next round, or for
the stream's age limit (core/jetstream.py) when a job below it is held longer.
"""

from __future__ import annotations

import asyncio
import logging

from kurrier.core.jetstream import DELIVERY_CONSUMER, DISPATCH_STREAM, NATS_AWAY
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

log = logging.getLogger(__name__)

CLEANUP_INTERVAL = 5.0


class JobCleanup:
    def __init__(self, js: JetStreamContext, interval: float = CLEANUP_INTERVAL) -> None:
        self._js = js
        self._interval = interval
        self._purged_below = 0

    async def run(self) -> None:
        while True:
            try:
                await self.once()
            except NATS_AWAY as error:
                log.warning("acknowledged jobs stay until NATS is back: %r", error)
            except Exception:
                log.exception("could not remove acknowledged jobs; trying again")
            await asyncio.sleep(self._interval)

    async def once(self) -> int:
        """Purge the jobs below the ack floor; returns the sequence purged up to (0: none)."""
        try:
            consumer = await self._js.consumer_info(DISPATCH_STREAM, DELIVERY_CONSUMER)
        except NotFoundError:
            return 0  # no delivery process has taken a job yet
        below = (consumer.ack_floor.stream_seq if consumer.ack_floor else 0) + 1
        if below <= self._purged_below:
            return 0
        await self._js.purge_stream(DISPATCH_STREAM, seq=below)
        self._purged_below = below
        return below
