"""Memory of each kurrier service while the queue fills up: is it bounded?

`python -m bench.queue_memory --messages 100000` runs `kurrier up` with a route
to a next hop that refuses every connection (so nothing leaves the queue and
every message is deferred), pushes the messages through SMTP from a few
reused sessions, and prints each service's RSS at every 10 % of the way, then
the queue's depth. Bounded means: RSS flattens while the queue keeps growing.
"""

from __future__ import annotations

import argparse
import json
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SERVICES = ("nats-server", "queue", "delivery", "ingress")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _config(dead_port: int) -> str:
    return f"""\
apiVersion: kurrier.io/v1alpha1
kind: RelayRoute
metadata: {{name: nowhere}}
spec:
  match: {{recipientDomains: ["example.com"]}}
  destination: {{smarthost: {{host: 127.0.0.1, port: {dead_port}}}}}
  tls: {{mode: none}}
---
apiVersion: kurrier.io/v1alpha1
kind: RelayPolicy
metadata: {{name: default}}
spec: {{trustedNetworks: ["127.0.0.0/8"]}}
"""


# Ingress caps commands per session (like Postfix's smtpd limits): reconnect.
PER_SESSION = 100


def _sender(port: int, count: int, start: int) -> None:
    body = b"Subject: fill\r\n\r\n" + (b"x" * 98 + b"\r\n") * 10
    for first in range(start, start + count, PER_SESSION):
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
            for number in range(first, min(first + PER_SESSION, start + count)):
                smtp.sendmail("load@client.test", [f"r{number}@example.com"], body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kurrier-queue-memory-"))
    config = workdir / "resources.yaml"
    config.write_text(_config(_free_port()))
    smtp_port = _free_port()
    up = subprocess.Popen(
        [
            *(sys.executable, "-m", "kurrier.cli", "up", "--config", str(config)),
            *("--data-dir", str(workdir / "data"), "--smtp", f"127.0.0.1:{smtp_port}"),
            *("--min-backoff", "1h", "--max-backoff", "1h", "--log-level", "WARNING"),
        ],
        stdout=subprocess.PIPE,
        stderr=(workdir / "up.log").open("wb"),
    )
    assert up.stdout is not None
    if not up.stdout.readline().startswith(b"kurrier ready"):
        print(f"kurrier up did not start; see {workdir}/up.log", file=sys.stderr)
        return 1
    pids = json.loads((workdir / "data" / "state.json").read_text())["pids"]
    print(f"{'messages':>9} " + " ".join(f"{name + ' MiB':>16}" for name in SERVICES))
    step = args.messages // 10
    started = time.monotonic()
    try:
        for sent in range(0, args.messages, step):
            per_client = step // args.clients
            threads = [
                threading.Thread(
                    target=_sender, args=(smtp_port, per_client, sent + i * per_client)
                )
                for i in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            rss = " ".join(f"{_rss_mib(pids[name]):16.1f}" for name in SERVICES)
            print(f"{sent + step:9d} {rss}", flush=True)
        data_dir = str(workdir / "data")
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "kurrier.cli",
                "queue",
                "list",
                "--json",
                "--data-dir",
                data_dir,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        queued = json.loads(listing.stdout).get("total", 0) if listing.returncode == 0 else "?"
        print(f"queued: {queued} in {time.monotonic() - started:.0f}s")
    finally:
        up.terminate()
        up.wait(timeout=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
