"""Leadership among queue processes: a NATS KV key that expires unless its holder refreshes it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from kurrier.core.jetstream import LEASE_TTL
from kurrier.core.lifecycle import cancel_and_wait
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)


class Lease:
    """Holds `name` while this process lives; runs `work` only while it does."""

    def __init__(self, kv: KeyValue, name: str) -> None:
        self._kv = kv
        self._name = name
        self._holder = f"{socket.gethostname()}:{os.getpid()}".encode()
        self._revision: int | None = None
        self._confirmed = 0.0  # when the last write that held the key was sent (loop time)

    async def _hold(self) -> bool:
        """Take the lease if free, refresh it if ours; True while we hold it.

        A refresh not confirmed within two thirds of the TTL after the last one
        counts as failed, however long the request itself would take to fail: the
        key may expire meanwhile and another process take it.
        """
        loop = asyncio.get_running_loop()
        sent = loop.time()
        deadline = None if self._revision is None else self._confirmed + LEASE_TTL * 2 / 3
        try:
            async with asyncio.timeout_at(deadline):
                if self._revision is None:
                    self._revision = await self._kv.create(self._name, self._holder)
                else:
                    self._revision = await self._kv.update(
                        self._name, self._holder, last=self._revision
                    )
            self._confirmed = sent
            return True
        except (KeyWrongLastSequenceError, KeyNotFoundError):
            self._revision = None
            return False
        except (NatsError, TimeoutError) as error:
            # NATS briefly away (node loss, election): step down rather than risk two
            # leaders; whoever holds the key when it settles carries on.
            log.warning("cannot confirm the %s lease: %r", self._name, error)
            self._revision = None
            return False

    async def run(self, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task: asyncio.Task[None] | None = None
        try:
            while True:
                held = await self._hold()
                if held and task is None:
                    log.info("took the %s lease", self._name)
                    task = asyncio.create_task(work())
                elif not held and task is not None:
                    log.warning("lost the %s lease", self._name)
                    task.cancel()
                    task = None
                await asyncio.sleep(LEASE_TTL / 3)
        finally:
            if task is not None:
                await cancel_and_wait(task)
