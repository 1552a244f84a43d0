"""Child processes of `kurrier up`: started in order, restarted with backoff, stopped in reverse."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MIN_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
# A child that ran this long is considered healthy again: its backoff resets.
STABLE_AFTER = 60.0
STOP_TIMEOUT = 40.0


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Have the kernel SIGKILL the child if `kurrier up` itself is killed (Linux)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None  # None: `kurrier up`'s own
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    delay: float = MIN_RESTART_DELAY
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


class Supervisor:
    def __init__(self, on_spawn: Callable[[], None] = lambda: None) -> None:
        self.children: list[Child] = []
        self._stopping = False
        self._on_spawn = on_spawn

    async def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, env)
        self.children.append(child)
        await self._spawn(child)
        child.watcher = asyncio.create_task(self._watch(child))
        return child

    async def _spawn(self, child: Child) -> None:
        # A session of its own: a terminal's Ctrl-C (sent to the whole foreground
        # group) reaches only `kurrier up`, which then stops children in order.
        child.process = await asyncio.create_subprocess_exec(
            *child.argv, env=child.env, start_new_session=True, preexec_fn=_die_with_parent
        )
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.process.pid)
        self._on_spawn()

    async def _watch(self, child: Child) -> None:
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping:
                return
            if time.monotonic() - child.started_at > STABLE_AFTER:
                child.delay = MIN_RESTART_DELAY
            log.warning("%s exited with %s; restarting in %.1fs", child.name, code, child.delay)
            await asyncio.sleep(child.delay)
            child.delay = min(MAX_RESTART_DELAY, child.delay * 2)
            if self._stopping:
                return
            child.restarts += 1
            await self._spawn(child)

    async def stop_all(self) -> None:
        """SIGTERM each child, last started first, and wait for it to drain."""
        self._stopping = True
        for child in reversed(self.children):
            if child.watcher:
                child.watcher.cancel()
            process = child.process
            if process is None or process.returncode is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await process.wait()
            except TimeoutError:
                log.error("%s did not stop in %ss; killing it", child.name, STOP_TIMEOUT)
                process.kill()
                await process.wait()
