"""Work done in rounds for as long as a service runs: the sweeper, the purges."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from kurrier.core.jetstream import NATS_AWAY


async def in_rounds(
    interval: float, one_round: Callable[[], Awaitable[object]], what: str, log: logging.Logger
) -> None:
    """Run one_round every interval seconds until cancelled.

    A round that fails is logged (on log, the caller's, so that the line
    names the module whose work failed) and the next one comes all the same:
    with NATS away (a node lost, a leader being elected) as a warning, for it
    heals by itself; anything else with its traceback.
    """
    while True:
        try:
            await one_round()
        except NATS_AWAY as error:
            log.warning(
                "%s: NATS or JetStream is away; next round in %.0fs: %r", what, interval, error
            )
        except Exception:
            log.exception("%s failed; next round in %.0fs", what, interval)
        await asyncio.sleep(interval)
