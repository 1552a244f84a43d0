"""Progress of a long admin operation: bounded in a log, live on a terminal."""

from __future__ import annotations

import io

from kurrier.cli.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_tenth_of_the_work_however_many_steps() -> None:
    log = io.StringIO()
    progress = Progress("delete", 1000, "deleted", log)
    for done in range(7, 1001, 7):  # 142 steps, none on a tenth exactly
        progress.advance(done, done - 1)
    progress.advance(1000, 999)
    progress.finish(999)
    *lines, summary = log.getvalue().splitlines()
    # The first step past each tenth: 105 (15 x 7), 203, ...
    first_past = [next(d for d in range(7, 1001, 7) if d >= t) for t in range(100, 1000, 100)]
    assert lines == [f"delete: {done}/1000 messages, {done - 1} deleted" for done in first_past]
    assert summary.startswith("delete: 1000/1000 messages, 999 deleted in ")


def test_a_terminal_gets_one_line_rewritten_at_every_step() -> None:
    terminal = Terminal()
    progress = Progress("hold", 3, "held", terminal)
    for done in (1, 2, 3):
        progress.advance(done, done)
    progress.finish(3)
    updates = terminal.getvalue().split("\r\x1b[K")
    assert updates[1:4] == [f"hold: {n}/3 messages, {n} held" for n in (1, 2, 3)]
    assert updates[4].startswith("hold: 3/3 messages, 3 held in ")
    assert updates[4].endswith("s\n") and "\n" not in "".join(updates[:4])
