"""Stopping ends every task, even one that lost its first cancellation."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import pytest
from kurrier.core.lifecycle import (
    YOUNGEST_GENERATION_THRESHOLD,
    cancel_and_wait,
    run_until,
)


class LosesFirstCancel:
    """A worker that runs on after its first cancellation, as one inside
    asyncio.wait_for does on Python 3.11 when the cancellation lands as the
    awaited call completes: a race no real call can be made to hit on demand."""

    def __init__(self) -> None:
        self.cancellations = 0

    async def __call__(self) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancellations += 1
                if self.cancellations > 1:
                    raise


@pytest.mark.asyncio
async def test_a_stop_ends_a_worker_that_lost_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = LosesFirstCancel()
    stop = asyncio.Event()
    stop.set()
    with caplog.at_level(logging.WARNING, "kurrier.core.lifecycle"):
        async with asyncio.timeout(30):
            await run_until(stop, worker())
    assert worker.cancellations == 2
    assert "went on after it was cancelled; cancelling it again" in caplog.text


@pytest.mark.asyncio
async def test_a_task_cleaning_up_after_its_cancellation_is_left_to_finish() -> None:
    cleaned = asyncio.Event()

    async def cleans_up() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.3)
            cleaned.set()

    task = asyncio.create_task(cleans_up())
    await asyncio.sleep(0)
    await cancel_and_wait(task, again_after=2)
    assert task.cancelled()
    assert cleaned.is_set()


@pytest.mark.asyncio
async def test_a_failure_at_stop_is_taken_and_ends_nothing_else() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("broke while stopping") from None

    failing = asyncio.create_task(fails_when_cancelled())
    quiet = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    await cancel_and_wait(failing, quiet)
    assert isinstance(failing.exception(), RuntimeError)
    assert quiet.cancelled()


def test_a_service_process_collects_rarely_and_never_walks_its_start_up() -> None:
    # In a process of its own: the test run's collector stays as it is.
    script = (
        "import gc\n"
        "from kurrier.core.lifecycle import run_service\n"
        "async def main():\n"
        "    print(gc.get_threshold()[0], gc.get_freeze_count())\n"
        "run_service(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    threshold, frozen = (int(word) for word in done.stdout.split())
    assert threshold == YOUNGEST_GENERATION_THRESHOLD
    # Everything imported by then (asyncio, uvloop, kurrier's modules) is left out.
    assert frozen > 0


# Builds and serialises gRPC requests of three 100 KB messages, as ingress does,
# and prints how many pages that faulted in.
_FAULTS_PER_REQUESTS = """
import resource, sys
from kurrier.core.lifecycle import run_service
from kurrier.v1 import queue_pb2
body = bytes(100 * 1024)
def request():
    messages = [queue_pb2.EnqueueMessageRequest(body=body) for _ in range(3)]
    return queue_pb2.EnqueueBatch(messages=messages).SerializeToString()
def faults():
    request()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        request()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
async def main():
    faults()
if sys.argv[1] == "service":
    run_service(main())
else:
    faults()
"""


def _page_faults(how: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_REQUESTS, how],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(done.stdout)


def test_a_service_process_reuses_freed_memory_instead_of_faulting_it_in() -> None:
    """With glibc's defaults each request maps and faults in its memory afresh
    (about 150 pages); a service keeps freed memory for the next one."""
    at_defaults, in_a_service = _page_faults("defaults"), _page_faults("service")
    assert at_defaults > 30 * 100, at_defaults  # the loop does fault at the defaults
    assert in_a_service < at_defaults / 20, (in_a_service, at_defaults)
