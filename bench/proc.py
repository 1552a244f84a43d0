"""CPU time and memory of a process tree, read from /proc (Linux only, no dependencies).

A tree's CPU time is the sum, over its live processes, of their own time plus the
time of the children they have reaped (utime + stime + cutime + cstime). A child
that exits between two readings is therefore still counted, in its parent's
cutime, as long as a process of the tree reaps it; Postfix's master reaps its
smtpd, cleanup and smtp processes, and `kurrier up` its services.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    name: str
    state: str
    cpu_seconds: float  # own + reaped children
    rss_bytes: int
    pss_bytes: int


def _read_stat(pid: int) -> tuple[int, str, str, float] | None:
    """(ppid, comm, state, cpu seconds incl. reaped children), or None if it is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # comm may hold spaces and parentheses: it ends at the last ')'.
    open_paren = raw.index(b"(")
    close_paren = raw.rindex(b")")
    comm = raw[open_paren + 1 : close_paren].decode(errors="replace")
    fields = raw[close_paren + 2 :].split()
    state = fields[0].decode()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return ppid, comm, state, (utime + stime + cutime + cstime) / CLOCK_TICKS


def _read_rss(pid: int) -> int:
    try:
        fields = (PROC / str(pid) / "statm").read_bytes().split()
    except OSError:
        return 0
    return int(fields[1]) * PAGE_SIZE if len(fields) > 1 else 0


def _read_pss(pid: int) -> int:
    """Proportional set size: shared pages split between the processes sharing them.

    Summing RSS over Postfix's dozens of processes counts libc and friends dozens
    of times; PSS sums to what the tree really occupies.
    """
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_bytes()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(b"Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def process_name(pid: int, comm: str) -> str:
    """A readable role: a kurrier service's subcommand, else the command's name."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return comm
    words = [a.decode(errors="replace") for a in argv if a]
    if "kurrier.cli" in words:
        index = words.index("kurrier.cli")
        if index + 1 < len(words):
            return words[index + 1]
    if len(words) > 2 and words[1].endswith("/kurrier"):
        return f"kurrier-{words[2]}"  # the `kurrier up` supervisor itself
    if comm == "master":
        return "master+exited"  # Postfix's master: reaped daemons (cleanup, smtp ...) land here
    return comm


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir(PROC) if entry.isdigit()]


def tree(root: int, with_memory: bool = True) -> list[ProcInfo]:
    """The root and all its live descendants."""
    parents: dict[int, tuple[int, str, str, float]] = {}
    for pid in _all_pids():
        stat = _read_stat(pid)
        if stat is not None:
            parents[pid] = stat
    if root not in parents:
        return []
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: list[ProcInfo] = []
    pending = [root]
    while pending:
        pid = pending.pop()
        ppid, comm, state, cpu = parents[pid]
        rss = 0 if state == "Z" or not with_memory else _read_rss(pid)
        pss = 0 if state == "Z" or not with_memory else _read_pss(pid)
        found.append(ProcInfo(pid, ppid, comm, state, cpu, rss, pss))
        pending.extend(children.get(pid, []))
    return found


@dataclass(frozen=True)
class TreeSample:
    cpu_seconds: float
    rss_bytes: int
    pss_bytes: int
    cpu_by_name: dict[str, float]


def sample(root: int, with_memory: bool = True) -> TreeSample:
    infos = tree(root, with_memory)
    by_name: dict[str, float] = {}
    for info in infos:
        name = process_name(info.pid, info.name)
        by_name[name] = by_name.get(name, 0.0) + info.cpu_seconds
    return TreeSample(
        cpu_seconds=sum(i.cpu_seconds for i in infos),
        rss_bytes=sum(i.rss_bytes for i in infos),
        pss_bytes=sum(i.pss_bytes for i in infos),
        cpu_by_name=by_name,
    )


def cpu_delta(before: TreeSample, after: TreeSample) -> dict[str, float]:
    """CPU seconds spent per process role between two samples.

    A role whose processes exited and were reaped in between can come out
    negative: their time moved into the parent's (reaped children) total.
    """
    names = set(before.cpu_by_name) | set(after.cpu_by_name)
    return {
        name: after.cpu_by_name.get(name, 0.0) - before.cpu_by_name.get(name, 0.0)
        for name in sorted(names)
    }
