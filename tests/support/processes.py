"""Starting real processes for tests and waiting for them properly (deadlines, not sleeps)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The product's own (`kurrier up` picks ports with it): one free_port for everyone.
from kurrier.cli.nats_server import free_port as free_port
from kurrier.cli.nats_server import port_is_free, port_range


def worker_port_range(index: int, count: int) -> tuple[int, int]:
    """The index-th of count equal parts of free_port's range (KURRIER_PORT_RANGE)."""
    first, last = port_range()
    size = (last - first) // count
    return first + index * size, first + (index + 1) * size


def free_ports(count: int) -> int:
    """The first of count consecutive free ports (`kurrier up --metrics-base-port`)."""
    for _ in range(100):
        base = free_port()
        if all(port_is_free(base + offset) for offset in range(1, count)):
            return base
    raise OSError(f"no {count} consecutive free ports")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll condition until true; fail the test with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_until for async tests: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def smtp_banner(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as connection:
            return connection.recv(3) == b"220"
    except OSError:
        return False


def kurrier_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "kurrier.cli", *args]


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def log_file(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{name}.log"
