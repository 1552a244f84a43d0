"""Log lines of one event-loop turn are written together, and none is lost or reordered."""

from __future__ import annotations

import asyncio
import io
import logging

from kurrier.core.logs import TurnBufferedHandler


def _logger(stream: io.StringIO) -> tuple[logging.Logger, TurnBufferedHandler]:
    handler = TurnBufferedHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test-logs-{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, handler


async def _one_turn(stream: io.StringIO, logger: logging.Logger) -> list[str]:
    seen = []
    logger.info("first")
    logger.info("second")
    seen.append(stream.getvalue())  # still this turn: nothing written yet
    await asyncio.sleep(0)  # the loop turns once; the pending write runs
    seen.append(stream.getvalue())
    logger.info("third")
    logger.warning("fourth")  # not held, and what was held goes first
    seen.append(stream.getvalue())
    return seen


def test_lines_of_one_turn_are_written_together_and_warnings_at_once() -> None:
    stream = io.StringIO()
    logger, _ = _logger(stream)
    assert asyncio.run(_one_turn(stream, logger)) == [
        "",
        "INFO first\nINFO second\n",
        "INFO first\nINFO second\nINFO third\nWARNING fourth\n",
    ]


def test_without_a_running_loop_lines_go_at_once_and_flush_empties_the_rest() -> None:
    stream = io.StringIO()
    logger, handler = _logger(stream)
    logger.info("outside a loop")
    assert stream.getvalue() == "INFO outside a loop\n"

    async def log_and_flush() -> str:
        logger.info("last words")
        handler.flush()  # what logging.shutdown does at exit, before the loop turns again
        return stream.getvalue()

    assert asyncio.run(log_and_flush()) == "INFO outside a loop\nINFO last words\n"
