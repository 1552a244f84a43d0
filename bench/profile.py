"""`python -m bench.profile`: where kurrier's CPU goes per message, service by service.

Runs `kurrier up` against the bench sink under the benchmark's load and
samples each Python service (ingress, queue, delivery) with py-spy for the
whole run, while /proc gives every process's CPU time (nats-server too). The
report (bench/results/profile-<timestamp>/profile.md) gives, per service, CPU
ms per message, the share of samples by package (self time) and the top
functions by self and by inclusive time, converted to microseconds per
message.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench import proc
from bench.interpreter import INTERPRETERS, describe, kurrier_python
from bench.loadgen import LoadSpec, run_load
from bench.loop import install_fast_loop
from bench.report import size_label
from bench.run import RESULTS, ensure_python_dependencies
from bench.sink import SinkProcess
from bench.systems import Kurrier, kurrier_snapshot

SERVICES = ("ingress", "queue", "delivery")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short_path(path: str) -> str:
    for marker in ("site-packages/", "services/", "lib/python3.11/"):
        index = path.rfind(marker)
        if index >= 0:
            return path[index + len(marker) :]
    return path


def package_of(path: str) -> str:
    """The package a frame's file belongs to: 'aiosmtpd', 'nats', 'kurrier.ingress' ..."""
    short = short_path(path)
    parts = short.split("/")
    if parts[0] == "kurrier" and len(parts) > 1:
        return f"kurrier.{parts[1].removesuffix('.py')}"
    if parts[0].endswith(".py"):
        return f"stdlib:{parts[0].removesuffix('.py')}"
    if "site-packages" not in path and "lib/python3" in path:
        return f"stdlib:{parts[0]}"
    return parts[0]


def frame_name(frame: str) -> tuple[str, str]:
    """(function (file), package) of a py-spy frame 'func (path:line)'."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), "native"
    path = match.group("file")
    return f"{match.group('func')} ({short_path(path)})", package_of(path)


@dataclass
class Profile:
    samples: int = 0
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    packages: Counter[str] = field(default_factory=Counter)


def read_collapsed(path: Path) -> Profile:
    """py-spy's raw (collapsed stack) output: 'frame;frame;... COUNT' per line."""
    profile = Profile()
    if not path.exists():
        return profile
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        # py-spy names the thread first ("thread (0x...)" / "process ..."): skip it.
        frames = [f for f in frames if not f[0].startswith(("thread ", "process "))]
        if not frames:
            continue
        profile.samples += count
        leaf, package = frames[-1]
        profile.self_time[leaf] += count
        profile.packages[package] += count
        for name in {name for name, _ in frames}:
            profile.inclusive[name] += count
    return profile


# Frames every sample passes through (the interpreter and the event loop's own
# plumbing): listing them inclusive says nothing.
_PLUMBING = re.compile(
    r"^(<module>|(\w+\.)?(run_forever|_run_once|run_until_complete|_run_module_as_main|"
    r"_run_code|_bootstrap|_bootstrap_inner)|(Runner\.)?run|main|_run_(ingress|queue|delivery)|"
    r"Handle\._run) \("
)


def service_report(
    name: str, profile: Profile, cpu_ms_per_msg: float, messages: int, top: int
) -> str:
    if profile.samples == 0:
        return f"### {name}\n\nno samples (py-spy failed?)\n"
    per_sample_us = cpu_ms_per_msg * 1000 / profile.samples  # µs/msg per sample share
    lines = [
        f"### {name}: {cpu_ms_per_msg:.2f} ms CPU per message "
        f"({profile.samples} samples over {messages} messages)",
        "",
        "Self time by package: "
        + ", ".join(
            f"{package} {count * 100 / profile.samples:.0f}%"
            for package, count in profile.packages.most_common(10)
            if count * 100 / profile.samples >= 1
        ),
        "",
        "| self µs/msg | self % | function |",
        "|---:|---:|---|",
    ]
    for function, count in profile.self_time.most_common(top):
        lines.append(
            f"| {count * per_sample_us:.0f} | {count * 100 / profile.samples:.1f} | `{function}` |"
        )
    lines += ["", "| incl. µs/msg | incl. % | function |", "|---:|---:|---|"]
    shown = 0
    for function, count in profile.inclusive.most_common():
        if _PLUMBING.match(function) or count == profile.samples:
            continue
        lines.append(
            f"| {count * per_sample_us:.0f} | {count * 100 / profile.samples:.1f} | `{function}` |"
        )
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines) + "\n"


async def profile_size(
    args: argparse.Namespace, sink: SinkProcess, size: int, out: Path, py_spy: str
) -> str:
    system = Kurrier(
        args.workdir / "kurrier-profile", sink.port, env=args.kurrier_env, python=args.python
    )
    await system.start()
    try:
        pids = {
            proc.process_name(info.pid, info.name): info.pid
            for info in proc.tree(system.root_pid, with_memory=False)
        }
        samplers = []
        for service in SERVICES:
            if service not in pids:
                raise RuntimeError(f"no {service} process under kurrier up: {pids}")
            command = [
                py_spy,
                "record",
                "--pid",
                str(pids[service]),
                "--duration",
                str(int(args.duration + 2)),
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "-o",
                str(out / f"{service}-{size}.txt"),
            ]
            # --native (C frames) needs py-spy to pause the process for each sample.
            command.append("--native" if args.native else "--nonblocking")
            samplers.append(
                await asyncio.create_subprocess_exec(
                    *command,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
        await asyncio.sleep(0.5)  # py-spy attached
        before = proc.sample(system.root_pid, with_memory=False)
        tag = f"profile{size}"
        load = await run_load(
            LoadSpec("127.0.0.1", system.smtp_port, tag, args.sessions, size, args.duration)
        )
        accepted = len(load.accepted)
        for _ in range(int(args.drain_timeout * 10)):
            if (await sink.count(tag))[0] >= accepted:
                break
            await asyncio.sleep(0.1)
        after = proc.sample(system.root_pid, with_memory=False)
        for sampler in samplers:
            await sampler.wait()
    finally:
        await system.stop()
    delivered, duplicates = await sink.count(tag)
    cpu = proc.cpu_delta(before, after)
    total_ms = sum(cpu.values()) * 1000 / max(1, delivered)
    seconds = (load.ended_ns - load.started_ns) / 1e9
    parts = [
        f"## {size_label(size)} messages, {args.sessions} sessions, {args.duration:g} s",
        "",
        f"{accepted} accepted ({accepted / seconds:.0f}/s), {delivered} delivered, "
        f"{duplicates} duplicates; {total_ms:.2f} ms CPU per message in all: "
        + ", ".join(
            f"{name} {value * 1000 / max(1, delivered):.2f}"
            for name, value in sorted(cpu.items(), key=lambda item: -item[1])
            if value > 0
        )
        + " (ms/msg; py-spy sampling adds a little to each Python service).",
        "",
    ]
    for service in SERVICES:
        profile = read_collapsed(out / f"{service}-{size}.txt")
        service_ms = cpu.get(service, 0.0) * 1000 / max(1, delivered)
        parts.append(service_report(service, profile, service_ms, delivered, args.top))
    return "\n".join(parts)


async def run(args: argparse.Namespace) -> Path:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is needed: pip install py-spy (the bench extra)")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or RESULTS / f"profile-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    commit, args.kurrier_env = kurrier_snapshot(args.kurrier_rev, args.workdir)
    args.python = kurrier_python(args.kurrier_python)
    sink = await SinkProcess.start()
    sections = [
        f"# kurrier CPU profile, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, kurrier at {commit} "
        f"on {describe(args.python)}",
        "",
        f"py-spy (`record --rate {args.rate} {'--native' if args.native else '--nonblocking'}`) "
        "on each service of `kurrier up`; "
        "µs/msg = the service's CPU ms per message (from /proc) times the function's share of "
        "its samples.",
        "",
    ]
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            sections.append(await profile_size(args, sink, size, out, py_spy))
    finally:
        await sink.stop()
    report = out / "profile.md"
    report.write_text("\n".join(sections))
    print("\n".join(sections))
    print(f"profile: {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--sizes", default="1024,102400")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15, help="functions listed per table")
    parser.add_argument("--native", action="store_true", help="include C frames (slower)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/kurrier-bench"))
    parser.add_argument("--kurrier-rev", default="HEAD", help="git revision, or 'working'")
    parser.add_argument(
        "--kurrier-python",
        choices=INTERPRETERS,
        default="optimised",
        help="what runs kurrier (as bench.run's option of that name)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    ensure_python_dependencies()
    install_fast_loop()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
