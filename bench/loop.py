"""The event loop of the benchmark's own tools (sink, load generator).

uvloop when it is installed (the `bench` extra): the tools share the machine's
two cores with the relay under test, so the less CPU they take the better.
"""

from __future__ import annotations

import asyncio
import importlib


def install_fast_loop() -> str:
    """Use uvloop's event loop policy if available; returns the loop's name."""
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
