"""Work started without being awaited is held until done and waited for on stop."""

from __future__ import annotations

import asyncio
import logging

import pytest
from kurrier.core.background import Background


async def test_finished_waits_for_work_started_while_it_waits() -> None:
    background = Background()
    first_may_end = asyncio.Event()
    ended: list[str] = []

    async def second() -> None:
        await asyncio.sleep(0)
        ended.append("second")

    async def first() -> None:
        await first_may_end.wait()
        background.start(second())  # as a draining queue's last messages still start work
        ended.append("first")

    background.start(first())
    waiting = asyncio.ensure_future(background.finished())
    await asyncio.sleep(0)
    assert not waiting.done()
    first_may_end.set()
    await asyncio.wait_for(waiting, 10)
    assert ended == ["first", "second"]
    assert len(background) == 0


async def test_a_failure_is_logged_and_a_cancellation_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    background = Background()

    async def fails() -> None:
        raise ValueError("the work broke")

    async def waits() -> None:
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR, logger="kurrier.core.background"):
        background.start(fails())
        background.start(waits())
        await asyncio.sleep(0)
        background.cancel()
        await asyncio.wait_for(background.finished(), 10)
    [failure] = caplog.records
    assert failure.exc_info is not None
    assert "the work broke" in str(failure.exc_info[1])


async def test_cancelling_the_wait_leaves_the_work_running() -> None:
    background = Background()
    release = asyncio.Event()
    work = background.start(release.wait())
    waiting = asyncio.ensure_future(background.finished())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert not work.done()
    release.set()
    await asyncio.wait_for(background.finished(), 10)
    assert work.done() and not work.cancelled()
