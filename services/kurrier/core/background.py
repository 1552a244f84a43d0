"""Work a component starts and does not wait for, kept until done and waited for on stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class Background:
    """Tasks started without being awaited: asyncio holds a running task only by a
    weak reference, so they are held here until done, and a stopping owner waits
    for them (`finished`) or cancels them (`cancel`).

    A task that fails is logged here with its traceback: nobody awaits it to
    see. `finished` only waits, and cancelling that wait leaves the tasks
    running.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("%s failed", task.get_coro(), exc_info=error)

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def finished(self) -> None:
        """Until every task is done, those started meanwhile included."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))
