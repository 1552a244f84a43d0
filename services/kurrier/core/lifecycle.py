"""Process lifecycle shared by the services: wait for SIGTERM/SIGINT, run tasks until then."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Collection, Coroutine
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


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
        stopper.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, stopper, return_exceptions=True)
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
        for task in [*tasks, *mains, stopper]:
            task.cancel()
        await asyncio.gather(*tasks, *mains, stopper, return_exceptions=True)


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's main coroutine on uvloop: the same asyncio, less CPU per message
    (4-13 % in the benchmark cells of 2026-11-29: bench/results/2026-11-29-bench-a320154.md)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
