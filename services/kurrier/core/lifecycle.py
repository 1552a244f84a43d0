"""Process lifecycle shared by the services: wait for SIGTERM/SIGINT, run tasks until then."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Collection, Coroutine
from typing import Any, NoReturn, TypeVar

from kurrier.core.allocator import keep_freed_memory

T = TypeVar("T")

log = logging.getLogger(__name__)

# How long a cancelled task may take to end (its own clean-up) before it is
# cancelled again.
CANCEL_AGAIN_AFTER = 5.0

# Allocations between collections of the youngest generation (CPython's
# default: 700). Handling one message allocates thousands of short-lived
# objects, nearly all freed by reference counting, so at the default the
# collector runs several times per message, and each full collection walks
# the whole heap. At 50,000 kurrier spends 0-7 % less CPU per message
# (bench/results/2026-12-06-collector-thresholds.md); the cyclic garbage
# that waits for it is at most a few MB.
YOUNGEST_GENERATION_THRESHOLD = 50_000


def signal_event(*signums: signal.Signals) -> asyncio.Event:
    """An event set by any of these signals."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in signums:
        loop.add_signal_handler(signum, event.set)
    return event


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the Kubernetes and the terminal way to stop)."""
    return signal_event(signal.SIGTERM, signal.SIGINT)


async def cancel_and_wait(
    *tasks: asyncio.Task[Any], again_after: float = CANCEL_AGAIN_AFTER
) -> None:
    """Cancel the tasks and wait until every one has ended; their results are dropped.

    One cancellation is not always enough: on Python 3.11 asyncio.wait_for
    (inside nats-py's fetch and reconnect loop, for instance) loses a
    cancellation that lands as the call it awaits completes, and the task runs
    on. A task still running after again_after is cancelled again.
    """
    running = {task for task in tasks if not task.done()}
    for task in running:
        task.cancel()
    while running:
        _, running = await asyncio.wait(running, timeout=again_after)
        for task in running:
            log.warning("%s went on after it was cancelled; cancelling it again", task.get_name())
            task.cancel()
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a task ended by a failure at stop says nothing more


def ended_unexpectedly(task: asyncio.Task[Any]) -> NoReturn:
    """A task that should have run on has ended: its failure, or that, is the process's."""
    task.result()  # re-raise the failure of a worker
    raise RuntimeError(f"worker {task.get_coro()!r} ended unexpectedly")


async def unless_stopped(stop: asyncio.Event, work: Coroutine[Any, Any, T]) -> T | None:
    """work's result, or None if stop is set first (work is then cancelled)."""
    task = asyncio.create_task(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_and_wait(task, stopper)
    return None if task.cancelled() else task.result()


async def run_until(
    stop: asyncio.Event,
    *workers: Coroutine[Any, Any, None],
    main: Coroutine[Any, Any, None] | None = None,
    watching: Collection[asyncio.Task[Any]] = (),
) -> None:
    """Run workers until stop is set; a worker that fails brings the process down.

    main, when given, is not cancelled at stop: it watches stop (or the signals)
    itself and finishes what it holds first; the run ends when it returns.
    watching: tasks started elsewhere that outlive the run; one that ends
    before stop brings the process down too.
    """
    tasks = [asyncio.create_task(worker) for worker in workers]
    mains = [asyncio.create_task(main)] if main is not None else []
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait(
            [*tasks, *mains, *watching, stopper], return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            if task in mains:
                task.result()  # main's end is the run's end; its failure is the run's
            elif task is not stopper:
                ended_unexpectedly(task)
        for task in tasks:
            task.cancel()
        for task in mains:
            await task
    finally:
        await cancel_and_wait(*tasks, *mains, stopper)


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's main coroutine on uvloop: the same asyncio, less CPU per message
    (4-13 % in the benchmark cells of 2026-11-29: bench/results/2026-11-29-bench-a320154.md),
    with the garbage collector and malloc tuned for it (settle_collector,
    core/allocator.py)."""
    import uvloop

    keep_freed_memory()
    settle_collector()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def settle_collector() -> None:
    """Leave what start-up made (modules, classes, the settings) out of every
    later collection, and collect the youngest generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNGEST_GENERATION_THRESHOLD, 20, 100)
