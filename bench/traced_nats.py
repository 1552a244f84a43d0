"""nats-server under strace, for counting and timing its writes and syncs.

A `nats-server` wrapper placed first on the PATH of `kurrier up` runs the
real server under `strace -f -ttt -y`, logging every pwrite64 (with the
start of what was written, which names the subject) and every
fsync/fdatasync. Used by bench/stored_writes.py and tests/faults/test_durability.py.
"""

from __future__ import annotations

import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from kurrier.cli.nats_server import nats_server_binary

_EVENT = re.compile(
    r"^\d+\s+(?P<at>\d+\.\d+) (?P<call>pwrite64|fsync|fdatasync)\(\d+<(?P<path>[^>]+)>(?P<rest>.*)$"
)


@dataclass(frozen=True)
class Event:
    at: float
    call: str
    path: str
    written: str  # the start of what a pwrite64 wrote, as strace prints it


def install_traced_nats_server(bindir: Path, trace: Path) -> None:
    """Write bindir/nats-server: the real one under strace, logging to trace.

    strace detaches from its tracee when it is stopped, so nats-server runs
    under setpriv with a parent-death signal: stopping the wrapper (strace)
    stops the server too, instead of leaving it running.
    """
    strace, setpriv = shutil.which("strace"), shutil.which("setpriv")
    if strace is None or setpriv is None:
        raise RuntimeError("needs strace (scripts/testbin.sh installs it) and setpriv (util-linux)")
    wrapper = bindir / "nats-server"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec {strace} -f -ttt -y -s 160 -e trace=pwrite64,fsync,fdatasync -o {trace} "
        f'{setpriv} --pdeathsig TERM {nats_server_binary()} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)


def block_file_events(trace: Path) -> list[Event]:
    """The writes and syncs of JetStream block files in the trace, in order."""
    events = []
    for line in trace.read_text(errors="replace").splitlines():
        found = _EVENT.match(line)
        if found and found["path"].endswith(".blk"):
            events.append(Event(float(found["at"]), found["call"], found["path"], found["rest"]))
    return events
