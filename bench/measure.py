"""One benchmark cell: start a relay, drive it, wait until the sink has everything, account."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import proc
from bench.loadgen import LoadSpec, run_load
from bench.sink import SinkProcess
from bench.systems import System


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of values (0 when there are none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class CellResult:
    system: str
    size: int
    sessions: int
    repeat: int
    tag: str
    durability: str = ""  # what the system's 250 survives, as configured
    duration: float = 0.0  # seconds the load ran
    attempted: int = 0
    accepted: int = 0
    refused: int = 0
    session_errors: int = 0
    unanswered: int = 0
    delivered: int = 0  # accepted ids that reached the sink
    lost: int = 0  # accepted ids that never reached it (within the drain timeout)
    duplicates: int = 0
    unexpected: int = 0  # at the sink although never accepted (unanswered or refused)
    drained: bool = False
    accepted_per_s: float = 0.0
    e2e_per_s: float = 0.0
    accept_p50_ms: float = 0.0
    accept_p99_ms: float = 0.0
    e2e_p50_ms: float = 0.0
    e2e_p99_ms: float = 0.0
    cpu_s: float = 0.0
    cpu_ms_per_msg: float = 0.0
    peak_rss_mb: float = 0.0  # sum of the processes' RSS (shared pages counted in each)
    peak_pss_mb: float = 0.0  # sum of their PSS (shared pages split): the fair figure
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    tool_cpu_s: float = 0.0  # load generator + sink, for the record
    stop_s: float = 0.0  # SIGTERM to exit (drain), after the cell
    stopped_cleanly: bool = True  # exited by itself (0) within the stop timeout

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _RssWatcher:
    """Samples the tree's total RSS every `interval` seconds; keeps the peak."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
        self.peak_pss = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            found = await asyncio.to_thread(proc.sample, self.root)
            self.peak = max(self.peak, found.rss_bytes)
            self.peak_pss = max(self.peak_pss, found.pss_bytes)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


async def measure_cell(
    system: System,
    sink: SinkProcess,
    spec: LoadSpec,
    repeat: int,
    drain_timeout: float,
    dump_dir: Path,
) -> CellResult:
    """Run one cell against an already started system."""
    cell = CellResult(
        system=system.name,
        size=spec.size,
        sessions=spec.sessions,
        repeat=repeat,
        tag=spec.tag,
        durability=system.durability,
    )
    root = system.root_pid
    watcher = _RssWatcher(root)
    watcher.start()
    before = proc.sample(root)
    sink_before = proc.sample(sink.process.pid, with_memory=False).cpu_seconds
    own_before = _own_cpu()

    load = await run_load(spec)

    # Wait until every accepted message is at the sink, or the drain timeout.
    accepted = {seq for seq, _, _ in load.accepted}
    deadline = time.monotonic() + drain_timeout
    arrivals: dict[int, tuple[int, int]] = {}
    duplicates = 0
    while True:
        unique, duplicates = await sink.count(spec.tag)
        if unique >= len(accepted):
            dump = await sink.dump(spec.tag, str(dump_dir / f"{spec.tag}.json"))
            raw = dump["arrivals"]
            assert isinstance(raw, dict)
            arrivals = {int(k): (int(v[0]), int(v[1])) for k, v in raw.items()}
            if accepted <= arrivals.keys():
                cell.drained = True
                break
        if time.monotonic() > deadline:
            dump = await sink.dump(spec.tag, str(dump_dir / f"{spec.tag}.json"))
            raw = dump["arrivals"]
            assert isinstance(raw, dict)
            arrivals = {int(k): (int(v[0]), int(v[1])) for k, v in raw.items()}
            break
        await asyncio.sleep(0.05)
    after = proc.sample(root)
    await watcher.stop()
    cell.tool_cpu_s = (
        proc.sample(sink.process.pid, with_memory=False).cpu_seconds
        - sink_before
        + _own_cpu()
        - own_before
    )

    delivered = accepted & arrivals.keys()
    cell.duration = (load.ended_ns - load.started_ns) / 1e9
    cell.attempted = load.attempted
    cell.accepted = len(accepted)
    cell.refused = load.refused
    cell.session_errors = load.errors
    cell.unanswered = len(load.unanswered)
    cell.delivered = len(delivered)
    cell.lost = len(accepted - arrivals.keys())
    cell.duplicates = duplicates
    cell.unexpected = len(arrivals.keys() - accepted)
    if load.accepted:
        last_accept = max(end for _, _, end in load.accepted)
        cell.accepted_per_s = len(accepted) / max(1e-9, (last_accept - load.started_ns) / 1e9)
        cell.accept_p50_ms = percentile([(e - s) / 1e6 for _, s, e in load.accepted], 0.50)
        cell.accept_p99_ms = percentile([(e - s) / 1e6 for _, s, e in load.accepted], 0.99)
    if delivered:
        last_arrival = max(arrivals[seq][0] for seq in delivered)
        cell.e2e_per_s = len(delivered) / max(1e-9, (last_arrival - load.started_ns) / 1e9)
        e2e = [(arrivals[seq][0] - arrivals[seq][1]) / 1e6 for seq in delivered]
        cell.e2e_p50_ms = percentile(e2e, 0.50)
        cell.e2e_p99_ms = percentile(e2e, 0.99)
    cell.cpu_s = after.cpu_seconds - before.cpu_seconds
    cell.cpu_ms_per_msg = cell.cpu_s * 1000 / max(1, len(delivered))
    cell.peak_rss_mb = max(watcher.peak, after.rss_bytes, before.rss_bytes) / 2**20
    cell.peak_pss_mb = max(watcher.peak_pss, after.pss_bytes, before.pss_bytes) / 2**20
    cell.cpu_by_process = {
        name: round(seconds, 3) for name, seconds in proc.cpu_delta(before, after).items()
    }
    return cell
