"""Work in rounds goes on after a round fails, saying how it failed."""

from __future__ import annotations

import asyncio
import logging

import pytest
from kurrier.core.rounds import in_rounds
from nats.errors import ConnectionClosedError


async def test_a_failed_round_is_logged_and_the_next_one_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outcomes: list[BaseException | None] = [
        ConnectionClosedError(),
        ValueError("broken"),
        None,
    ]
    done = asyncio.Event()

    async def one_round() -> None:
        failure = outcomes.pop(0)
        if failure is not None:
            raise failure
        done.set()
        await asyncio.Event().wait()  # the third round lasts until the test ends

    log = logging.getLogger("kurrier.test.rounds")
    with caplog.at_level(logging.WARNING, log.name):
        rounds = asyncio.create_task(in_rounds(0, one_round, "testing", log))
        await asyncio.wait_for(done.wait(), timeout=5)
        rounds.cancel()
        with pytest.raises(asyncio.CancelledError):
            await rounds
    warning, error = caplog.records
    # On the caller's logger: the line names the module whose work failed.
    assert warning.name == error.name == log.name
    # NATS away heals by itself: a warning. Anything else: an error with its traceback.
    assert warning.levelno == logging.WARNING
    assert "testing: NATS or JetStream is away" in warning.getMessage()
    assert warning.exc_info is None
    assert error.levelno == logging.ERROR
    assert error.getMessage().startswith("testing failed")
    assert error.exc_info is not None and isinstance(error.exc_info[1], ValueError)
