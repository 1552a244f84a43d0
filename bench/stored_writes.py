"""How many JetStream writes and syncs one accepted message costs, stream by stream.

`python -m bench.stored_writes --messages 200 [--size 102400]` runs `kurrier up` (one node,
its default sync setting unless --nats-sync is given) with nats-server under
strace, sends the messages one at a time to a `kurrier sink`, waits until
each has arrived, and counts nats-server's pwrite64 and fsync/fdatasync
calls on JetStream's block files while the messages went through, divided
by the number of messages: the figure to cut when syncing every write is
the promise. Needs strace (scripts/testbin.sh installs it).

With --deferred the next hop answers every recipient `451`, and the count
runs until each message's first attempt is deferred and recorded: what a
deferral costs (the result, the record's update, the retry's schedule, and
what removes the result).
"""

from __future__ import annotations

import argparse
import os
import re
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from bench.report import size_label
from bench.traced_nats import block_file_events, install_traced_nats_server

_STREAM = re.compile(r"/streams/(?P<stream>[^/]+)/")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _kurrier(*args: str) -> list[str]:
    return [sys.executable, "-m", "kurrier.cli", *args]


def _count(trace: Path) -> Counter[tuple[str, str]]:
    """(stream, call) -> calls on block files; 'sync' stands for fsync and fdatasync."""
    counts: Counter[tuple[str, str]] = Counter()
    for event in block_file_events(trace):
        stream = _STREAM.search(event.path)
        call = "write" if event.call == "pwrite64" else "sync"
        counts[(stream["stream"] if stream else "?", call)] += 1
    return counts


class _Deferring:
    """A next hop that defers every recipient, counting the attempts."""

    def __init__(self) -> None:
        self.attempts = 0

    async def handle_RCPT(
        self,
        server: SMTPServer,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        self.attempts += 1
        return "451 4.3.0 deferring everything"


def _settled(trace: Path, quiet: float = 2.0, limit: float = 60.0) -> Counter[tuple[str, str]]:
    """The counts once nats-server has written nothing new for `quiet` seconds."""
    counts, still_since, deadline = _count(trace), time.monotonic(), time.monotonic() + limit
    while time.monotonic() - still_since < quiet:
        if time.monotonic() > deadline:
            raise SystemExit(f"nats-server kept writing for {limit:.0f} s")
        time.sleep(0.25)
        now = _count(trace)
        if now != counts:
            counts, still_since = now, time.monotonic()
    return counts


def message_of(size: int) -> bytes:
    """A message of size octets or the next line's end past it: lines of 72."""
    head = b"Subject: count\r\n\r\n"
    return head + (b"x" * 70 + b"\r\n") * max(1, -(-(size - len(head)) // 72))


def measure(
    messages: int, sync: str | None, workdir: Path, deferred: bool = False, size: int = 1024
) -> Counter[tuple[str, str]]:
    bindir, trace, mail = workdir / "bin", workdir / "nats.strace", workdir / "mail"
    bindir.mkdir()
    install_traced_nats_server(bindir, trace)
    sink_port, smtp_port = _free_port(), _free_port()
    config = workdir / "resources.yaml"
    config.write_text(
        "apiVersion: kurrier.io/v1alpha1\nkind: RelayRoute\nmetadata: {name: sink}\n"
        f"spec: {{match: {{recipientDomains: ['*']}}, destination: {{smarthost: "
        f"{{host: 127.0.0.1, port: {sink_port}}}}}, tls: {{mode: none}}}}\n---\n"
        "apiVersion: kurrier.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: trust}\n"
        "spec: {trustedNetworks: ['127.0.0.0/8']}\n"
    )
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    deferring = _Deferring()
    next_hop = Controller(deferring, hostname="127.0.0.1", port=sink_port)
    sink: subprocess.Popen[bytes] | None = None
    if deferred:
        next_hop.start()
    else:
        sink = subprocess.Popen(
            _kurrier("sink", "--listen", f"127.0.0.1:{sink_port}", "--dir", str(mail)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    sync_flag = ["--nats-sync", sync] if sync else []
    up = subprocess.Popen(
        _kurrier(
            "up",
            "--config",
            str(config),
            "--data-dir",
            str(workdir / "data"),
            "--smtp",
            f"127.0.0.1:{smtp_port}",
            *sync_flag,
        ),
        env=env,
        stdout=subprocess.PIPE,
        stderr=(workdir / "up.log").open("wb"),
    )
    try:
        assert up.stdout is not None
        if not up.stdout.readline().startswith(b"kurrier ready"):
            raise SystemExit(f"kurrier up did not start; see {workdir / 'up.log'}")
        before = _count(trace)
        body = message_of(size)
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
            for _ in range(messages):
                smtp.sendmail("a@client.test", ["r@example.com"], body)
        deadline = time.monotonic() + 120
        while (deferring.attempts if deferred else len(list(mail.glob("*")))) < messages:
            if time.monotonic() > deadline:
                raise SystemExit("not every message arrived or was tried within 120 s")
            time.sleep(0.1)
        # What the last attempt leaves to do (results, acks, purges) follows
        # within moments; the first retry is minutes away.
        return _settled(trace) - before
    finally:
        up.terminate()
        up.wait(timeout=60)
        if sink is not None:
            sink.terminate()
            sink.wait(timeout=10)
        else:
            next_hop.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--nats-sync", default=None, help="passed to kurrier up")
    parser.add_argument(
        "--deferred", action="store_true", help="a next hop that defers every recipient"
    )
    parser.add_argument("--size", type=int, default=1024, help="octets per message")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kurrier-writes-") as scratch:
        counts = measure(args.messages, args.nats_sync, Path(scratch), args.deferred, args.size)
    fate = "deferred once" if args.deferred else "delivered"
    label = size_label(len(message_of(args.size)))
    print(f"per accepted {label} message, {fate} ({args.messages} messages, one at a time):")
    print(f"{'stream':<28} {'writes':>7} {'syncs':>7}")
    for stream in sorted({s for s, _ in counts}):
        writes = counts[(stream, "write")] / args.messages
        syncs = counts[(stream, "sync")] / args.messages
        print(f"{stream:<28} {writes:7.2f} {syncs:7.2f}")
    total_w = sum(v for (_, c), v in counts.items() if c == "write") / args.messages
    total_s = sum(v for (_, c), v in counts.items() if c == "sync") / args.messages
    print(f"{'all':<28} {total_w:7.2f} {total_s:7.2f}")


if __name__ == "__main__":
    main()
