"""Counting log lines a component under test writes, by their text."""

from __future__ import annotations

import logging


class LogCounter(logging.Handler):
    """Counts records at ERROR or above whose message contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.ERROR)
        self.text = text
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += self.text in record.getMessage()
