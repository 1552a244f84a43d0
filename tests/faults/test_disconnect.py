"""Closing a NATS connection ends its reconnect loop even when a cancellation is lost."""

from __future__ import annotations

import asyncio

import pytest
from kurrier.core.jetstream import connect, disconnect

from tests.support.nats import NatsServer


@pytest.mark.asyncio
async def test_a_reconnect_loop_that_loses_a_cancellation_still_ends(
    nats_server: NatsServer,
) -> None:
    nc = await connect(nats_server.url, "test-disconnect")
    cancellations = 0

    async def reconnect_loop() -> None:
        # Stands in for nats-py's loop at the moment Python 3.11's wait_for
        # completes a connect and drops the cancellation that arrived with it:
        # a race no real server can be made to hit on demand.
        nonlocal cancellations
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations > 1:
                    raise

    nc._reconnection_task = asyncio.get_running_loop().create_task(reconnect_loop())
    await asyncio.sleep(0)
    await disconnect(nc)
    assert nc._reconnection_task.done()
    assert cancellations == 2
