"""Writing items of a shared stream in batches, by one task.

Every write on a gRPC stream is handed between the event loop and gRPC's
threads, and on a VM each hand-off is a wake-up of another CPU, the largest
cost per message in ingress and the queue when each item is written alone.
The items added
during one turn of the event loop, or while the previous write was in flight,
go out together in the next write, so under load the batches grow by
themselves.

With `gather`, a batch also waits, at most that long, until as many items
have come as the previous batch carried: where writers move in step (SMTP
sessions all answered by one stored batch start their next messages within
a few milliseconds of each other) the batch is then one write, not a write
for the first item and another for the rest. A lone writer's batches carry
one item, so it never waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BatchWriter(Generic[T]):
    """Writes what is added in batches of at most `limit` (by `size`; one item always fits).

    write(batch) sends one batch. If it raises, the writer stops and calls
    on_failure with the batch that failed and everything not yet written, and
    the error; later items are refused (added() returns False).
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[object]],
        on_failure: Callable[[list[T], BaseException], None],
        limit: int = 0,
        size: Callable[[T], int] = lambda _: 0,
        gather: float = 0.0,
    ) -> None:
        self._write = write
        self._on_failure = on_failure
        self._limit = limit
        self._size = size
        self._gather = gather
        self._last_count = 0
        self._pending: list[T] = []
        self._writing: list[T] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._failed = False
        self._task = asyncio.create_task(self._run())

    def add(self, item: T) -> bool:
        """Queue item for the next write; False once the writer has failed or closed."""
        if self._failed or self._closing:
            return False
        self._pending.append(item)
        self._wake.set()
        return True

    def take_back(self, item: T) -> bool:
        """Remove an item no write has started on; False if it is being or was written."""
        for index, candidate in enumerate(self._pending):
            if candidate is item:
                del self._pending[index]
                return True
        return False

    def is_being_written(self, item: T) -> bool:
        """Whether item is in the write in flight (sent in part, perhaps, or not at all)."""
        return any(candidate is item for candidate in self._writing)

    async def close(self) -> None:
        """Write everything added so far, then stop."""
        self._closing = True
        self._wake.set()
        await asyncio.shield(self._task)

    def cancel(self) -> None:
        """Stop at once; a write in flight is cut short and reported to on_failure."""
        self._task.cancel()

    async def _run(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if self._gather:
                    await self._gathered()
                    if not self._pending:
                        continue  # all taken back while the batch gathered
                self._writing = self._next_batch()
                self._last_count = len(self._writing)
                await self._write(self._writing)
                self._writing = []
        except BaseException as error:
            self._failed = True
            unsent, self._writing, self._pending = self._writing + self._pending, [], []
            self._on_failure(unsent, error)
            if not isinstance(error, Exception):
                raise

    async def _gathered(self) -> None:
        """Return once as many items wait as the last batch carried, or gather has passed."""
        if len(self._pending) >= self._last_count:
            return
        try:
            async with asyncio.timeout(self._gather):
                while len(self._pending) < self._last_count and not self._closing:
                    self._wake.clear()
                    await self._wake.wait()
        except TimeoutError:
            pass

    def _next_batch(self) -> list[T]:
        count, total = 0, 0
        for item in self._pending:
            total += self._size(item)
            if count and self._limit and total > self._limit:
                break
            count += 1
        batch, self._pending = self._pending[:count], self._pending[count:]
        return batch
