"""`make bench` / `python -m bench.run`: kurrier against Postfix and Haraka, same load, one run.

For every repeat, message size and session count, every relay runs the same
closed-loop load in turn (the order alternates between repeats), each started
fresh and stopped after its cell. Results (JSON, a Markdown table, PNG
charts) go to bench/results/<timestamp>/; a full run also refreshes the
charts in bench/img/ that bench/README.md shows.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import report
from bench.haraka import Haraka, install_haraka
from bench.interpreter import INTERPRETERS, REPO, describe, kurrier_python
from bench.loadgen import LoadSpec, run_load
from bench.loop import install_fast_loop
from bench.measure import CellResult, measure_cell
from bench.sink import SinkProcess
from bench.systems import (
    Kurrier,
    KurrierVariant,
    Postfix,
    System,
    experiment_env,
    install_postfix,
    kurrier_command,
    kurrier_snapshot,
    postfix_version,
)

RESULTS = REPO / "bench" / "results"
IMAGES = REPO / "bench" / "img"
# The `bench` extra: what the tooling needs beyond kurrier's own dependencies.
BENCH_REQUIREMENTS = {"matplotlib": "matplotlib>=3.8", "uvloop": "uvloop>=0.19"}


def ensure_python_dependencies() -> None:
    """Install the bench extra's packages into this interpreter if they are missing."""
    missing = [req for mod, req in BENCH_REQUIREMENTS.items() if not importlib.util.find_spec(mod)]
    if missing:
        print(f"installing {', '.join(missing)} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
        importlib.invalidate_caches()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run: 10 sessions, 4 s, 1 repeat"
    )
    parser.add_argument("--sizes", default="1024,102400", help="message sizes in bytes")
    parser.add_argument("--sessions", default=None, help="concurrent SMTP sessions (10,50)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per cell (15)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of each cell (3)")
    parser.add_argument(
        "--kurrier-rev",
        default="HEAD",
        help="git revision of kurrier to run (default HEAD; 'working' = the work tree as is)",
    )
    parser.add_argument(
        "--kurrier-python",
        choices=INTERPRETERS,
        default="optimised",
        help="what runs kurrier: 'optimised' (Debian's python3.11, PGO and LTO, as the image's "
        "CPython is built; the default) or 'running' (this interpreter); bench/interpreter.py",
    )
    parser.add_argument("--per-session", type=int, default=100, help="messages per connection")
    parser.add_argument("--max-messages", type=int, default=200_000, help="cap per cell")
    parser.add_argument("--drain-timeout", type=float, default=90.0, help="seconds after load")
    parser.add_argument(
        "--systems",
        default="kurrier,kurrier/cluster=3,postfix,haraka",
        help="kurrier, postfix, haraka, kurrier@REV (another git revision, measured beside the "
        "first), kurrier+EXPERIMENT[+...] variants (bench/experiments: uvloop), and any kurrier "
        "with /cluster=N (`kurrier up --nats-cluster N`), /sync=INTERVAL (its NATS's "
        "sync_interval, e.g. kurrier/sync=2m), /batch=N (`--atomic-batch-min N`) or "
        "/python=NAME (as --kurrier-python), each measured like the others",
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("/var/tmp/kurrier-bench"), help="relay state (disk)"
    )
    parser.add_argument("--out", type=Path, default=None, help="results dir (default: timestamped)")
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip measuring the sink's own ceiling"
    )
    parser.add_argument(
        "--publish-images",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="copy the charts to bench/img (default: on for full runs, off with --quick)",
    )
    args = parser.parse_args(argv)
    quick = {"sessions": "10", "duration": 4.0, "repeats": 1}
    full = {"sessions": "10,50", "duration": 15.0, "repeats": 3}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.publish_images is None:
        args.publish_images = not args.quick
    return args


async def sink_ceiling(sink: SinkProcess, duration: float) -> list[tuple[int, int, float]]:
    """The load generator straight into the sink: (size, sessions, msg/s) the tooling manages."""
    found = []
    for size in (1024, 102400):
        for sessions in (10, 50):
            tag = f"ceiling{size}x{sessions}"
            load = await run_load(LoadSpec("127.0.0.1", sink.port, tag, sessions, size, duration))
            await asyncio.sleep(0.3)
            unique, duplicates = await sink.count(tag)
            if unique != len(load.accepted) or duplicates:
                raise RuntimeError(f"sink accounting is off: {unique} != {len(load.accepted)}")
            seconds = (load.ended_ns - load.started_ns) / 1e9
            found.append((size, sessions, unique / seconds))
    return found


def machine_header(
    args: argparse.Namespace,
    peers: str,
    loop: str,
    commit: str,
    env: dict[str, str],
    pythons: dict[str, str],
) -> str:
    kurrier = subprocess.run(
        [*kurrier_command(pythons[args.kurrier_python]), "--help"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )
    interpreters = "; ".join(f"{describe(path)} as {choice}" for choice, path in pythons.items())
    return (
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()} "
        f"({os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, tooling on {loop}); kurrier at {commit}"
        f"{'' if kurrier.returncode == 0 else ' (kurrier --help failed!)'} on {interpreters}, "
        f"{peers}. {args.duration:g} s of load per cell, "
        f"{args.repeats} repeat(s), {args.per_session} messages per SMTP session. "
        f"Load average before: {os.getloadavg()[0]:.2f}."
    )


async def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    session_counts = [int(s) for s in args.sessions.split(",")]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    loop_name = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    postfix = install_postfix() if "postfix" in systems else postfix_version()
    haraka = install_haraka() if "haraka" in systems else None
    peers = f"Postfix {postfix or 'absent'}" + (f", Haraka {haraka}" if haraka else "")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or RESULTS / stamp
    out.mkdir(parents=True, exist_ok=True)
    dumps = out / "arrivals"
    dumps.mkdir(exist_ok=True)
    commit, env = kurrier_snapshot(args.kurrier_rev, args.workdir)
    args.kurrier_env = env
    choices = {args.kurrier_python} | {
        KurrierVariant.parse(name).python or args.kurrier_python
        for name in systems
        if name.startswith("kurrier")
    }
    args.pythons = {choice: kurrier_python(choice) for choice in sorted(choices)}
    header = machine_header(args, peers, loop_name, commit, env, args.pythons)
    print(header, flush=True)
    started = time.monotonic()

    sink = await SinkProcess.start()
    cells: list[CellResult] = []
    ceiling: list[tuple[int, int, float]] = []
    try:
        if not args.no_ceiling:
            ceiling = await sink_ceiling(sink, 2.0 if args.quick else 4.0)
            for size, sessions, rate in ceiling:
                print(
                    f"sink ceiling: {report.size_label(size)}, {sessions} sessions: "
                    f"{rate:.0f} msg/s (load generator straight into the sink)",
                    flush=True,
                )
        for repeat in range(args.repeats):
            for size in sizes:
                for sessions in session_counts:
                    order = systems if repeat % 2 == 0 else list(reversed(systems))
                    for name in order:
                        cell = await run_one(args, name, sink, size, sessions, repeat, dumps)
                        cells.append(cell)
                        print(
                            f"[{time.monotonic() - started:5.0f}s] {name:8s} "
                            f"{report.size_label(size):>6s} x{sessions:<3d} r{repeat}: "
                            f"accepted {cell.accepted_per_s:6.0f}/s  e2e {cell.e2e_per_s:6.0f}/s  "
                            f"cpu {cell.cpu_ms_per_msg:5.2f} ms/msg  "
                            f"pss {cell.peak_pss_mb:4.0f} MB  "
                            f"lost {cell.lost} dup {cell.duplicates}  stop {cell.stop_s:.1f}s"
                            f"{'' if cell.drained else '  NOT DRAINED'}"
                            f"{'' if cell.stopped_cleanly else '  (killed: no clean exit)'}",
                            flush=True,
                        )
                        save(out, header, ceiling, cells)
        # Late duplicates (a redelivery after the cell ended) still count.
        stats = await sink.stats()
        for cell in cells:
            counts = stats.get(cell.tag)
            if isinstance(counts, list):
                cell.duplicates = max(cell.duplicates, int(counts[1]))
    finally:
        await sink.stop()
    header += f" Load average after: {os.getloadavg()[0]:.2f}."
    text = save(out, header, ceiling, cells)
    written = report.charts(cells, out)
    if args.publish_images:
        IMAGES.mkdir(exist_ok=True)
        for path in written:
            shutil.copy(path, IMAGES / path.name)
    print("\n" + text + "\n", flush=True)
    print(f"results: {out} ({time.monotonic() - started:.0f} s)", flush=True)
    bad = [c for c in cells if c.system.startswith("kurrier") and (c.lost or c.duplicates)]
    if bad:
        print(f"kurrier lost or duplicated mail in {len(bad)} cell(s)!", flush=True)
        return 1
    return 0


def save(
    out: Path, header: str, ceiling: list[tuple[int, int, float]], cells: list[CellResult]
) -> str:
    (out / "cells.json").write_text(
        json.dumps(
            {
                "header": header,
                "sink_ceiling": [
                    {"size": size, "sessions": n, "msgs_per_s": round(rate)}
                    for size, n, rate in ceiling
                ],
                "cells": [c.to_json() for c in cells],
            },
            indent=1,
        )
    )
    text = report.summary(cells, lambda: header)
    (out / "summary.md").write_text(text + "\n")
    return text


async def run_one(
    args: argparse.Namespace,
    name: str,
    sink: SinkProcess,
    size: int,
    sessions: int,
    repeat: int,
    dumps: Path,
) -> CellResult:
    slug = re.sub(r"\W", "", name)
    workdir: Path = args.workdir / slug
    system: System
    if name.startswith("kurrier"):
        variant = KurrierVariant.parse(name)
        code = (
            args.kurrier_env
            if variant.revision is None
            else kurrier_snapshot(variant.revision, args.workdir)[1]
        )
        system = Kurrier(
            workdir,
            sink.port,
            env=experiment_env(code, variant.experiments),
            variant=variant,
            name=name,
            python=args.pythons[variant.python or args.kurrier_python],
        )
    elif name == "postfix":
        system = Postfix(workdir, sink.port)
    elif name == "haraka":
        system = Haraka(workdir, sink.port)
    else:
        raise ValueError(f"unknown system {name!r}")
    tag = f"{slug}{size}s{sessions}r{repeat}"
    spec = LoadSpec(
        host="127.0.0.1",
        port=system.smtp_port,
        tag=tag,
        sessions=sessions,
        size=size,
        duration=args.duration,
        max_messages=args.max_messages,
        per_session=args.per_session,
    )
    await system.start()
    try:
        cell = await measure_cell(system, sink, spec, repeat, args.drain_timeout, dumps)
    finally:
        await system.stop()
    cell.stop_s = round(system.stop_seconds, 2)
    cell.stopped_cleanly = system.stopped_cleanly
    log = workdir / "kurrier.log"
    if not cell.stopped_cleanly and log.exists():
        # The next cell wipes the work directory; keep what the hung stop said.
        shutil.copy(log, dumps.parent / f"unclean-stop-{tag}.log")
    return cell


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_python_dependencies()
    install_fast_loop()
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
