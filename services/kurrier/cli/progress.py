"""How far a long admin operation (`kurrier queue delete --all`, `flush` ...) has got.

Counts go to stderr, so stdout stays the result a script reads. On a
terminal one line is rewritten in place after every step; elsewhere (a log,
a CI job) a line is written each time another tenth of the work is done, so
the whole operation writes at most ten, whatever its size. The last line says
what was done and how long it took.
"""

from __future__ import annotations

import time
from typing import TextIO

STEPS = 10


class Progress:
    def __init__(self, what: str, total: int, verb: str, stream: TextIO) -> None:
        """what names the operation (`delete`); verb is what the
        operation did to a message that it changed (`deleted`)."""
        self._what = what
        self._total = total
        self._verb = verb
        self._stream = stream
        self._in_place = stream.isatty()
        self._started = time.monotonic()
        self._shown_steps = 0

    def _line(self, done: int, changed: int) -> str:
        return f"{self._what}: {done}/{self._total} messages, {changed} {self._verb}"

    def advance(self, done: int, changed: int) -> None:
        """done messages of the total handled so far, changed of them acted on."""
        if self._in_place:
            self._stream.write(f"\r\x1b[K{self._line(done, changed)}")
        else:
            steps = done * STEPS // max(self._total, 1)
            if steps <= self._shown_steps or done >= self._total:
                return
            self._shown_steps = steps
            self._stream.write(self._line(done, changed) + "\n")
        self._stream.flush()

    def finish(self, changed: int) -> None:
        elapsed = time.monotonic() - self._started
        start = "\r\x1b[K" if self._in_place else ""
        self._stream.write(f"{start}{self._line(self._total, changed)} in {elapsed:.1f}s\n")
        self._stream.flush()
