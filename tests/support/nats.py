"""A real nats-server with JetStream on a free port and a temporary store."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kurrier.cli.nats_server import cluster_nodes, nats_server_argv
from kurrier.core.jetstream import JOBS_STREAM, connect, disconnect, ensure_layout
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError

from tests.support.processes import free_port, port_open, wait_until


class NatsServer:
    def __init__(
        self,
        store_dir: Path,
        log_dir: Path,
        max_file_store: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """extra_args go to nats-server as they are (e.g. --user/--pass to require them)."""
        self.store_dir = store_dir
        self.port = free_port()
        self._log = log_dir / "nats-server.log"
        self._config = log_dir / "nats-server.conf"
        self._max_file_store = max_file_store
        self._extra_args = list(extra_args)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (or restart) on the same port with the same store."""
        argv = nats_server_argv(self.store_dir, self.port) + self._extra_args
        if self._max_file_store:
            # Only a config file can cap JetStream's disk: a "full disk" on demand.
            # (store_dir stays on the command line; the file may not repeat it).
            self._config.write_text(f"jetstream {{ max_file_store: {self._max_file_store} }}\n")
            argv += ["--config", str(self._config)]
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(argv, stdout=log, stderr=log)
        wait_until(lambda: port_open(self.port), 30, "nats-server to listen")

    def stop(self, kill: bool = False) -> None:
        if self._process is None:
            return
        if kill:
            self._process.kill()
        else:
            self._process.terminate()
        self._process.wait(timeout=30)
        self._process = None
        wait_until(lambda: not port_open(self.port), 10, "nats-server to stop listening")


class NatsCluster:
    """Three (or n) real nats-servers routed into one JetStream cluster on loopback."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = cluster_nodes(size)
        self.ports = [free_port() for _ in self.nodes]
        self._workdir = workdir
        self._processes: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, first: int = 0) -> str:
        """All members, starting with node `first`: clients spread over the cluster."""
        order = self.ports[first:] + self.ports[:first]
        return ",".join(f"nats://127.0.0.1:{port}" for port in order)

    def start(self, name: str) -> None:
        index = [node.name for node in self.nodes].index(name)
        node, port = self.nodes[index], self.ports[index]
        with (self._workdir / f"{name}.log").open("ab") as log:
            self._processes[name] = subprocess.Popen(
                nats_server_argv(self._workdir / name, port, cluster=node),
                stdout=log,
                stderr=log,
            )
        wait_until(lambda: port_open(port), 30, f"{name} to listen")

    def start_all(self) -> None:
        for node in self.nodes:
            self.start(node.name)

    def kill(self, name: str) -> None:
        process = self._processes.pop(name)
        process.kill()
        process.wait(timeout=30)

    def signal(self, name: str, number: signal.Signals) -> None:
        self._processes[name].send_signal(number)

    def stop_all(self) -> None:
        for name in list(self._processes):
            process = self._processes.pop(name)
            process.send_signal(signal.SIGCONT)  # a stopped one cannot take SIGTERM
            process.terminate()
            process.wait(timeout=30)


async def _cluster_layout_error(url: str) -> str | None:
    nc = await connect(url, "test-cluster-setup")
    try:
        await ensure_layout(nc.jetstream(), 3, owner=True)
        return None
    except (JetStreamError, TimeoutError) as error:
        return repr(error)
    finally:
        await disconnect(nc)


def cluster_layout_error(url: str) -> str | None:
    """Create the R3 layout; returns an error text while the cluster still elects leaders."""
    return asyncio.run(_cluster_layout_error(url))


async def _stream_leader(url: str) -> str:
    """The jobs stream's leader; '' while it has none."""
    nc = await connect(url, "test-cluster-leader")
    try:
        info = await nc.jetstream().stream_info(JOBS_STREAM)
        return str(info.cluster.leader or "") if info.cluster is not None else ""
    finally:
        await disconnect(nc)


def stream_leader(url: str, timeout: float = 60) -> str:
    """The server name of the jobs stream's leader, once it has one: a cluster that
    just lost or regained a node may be electing it, and answer 503 meanwhile."""
    leaders: list[str] = []

    def known() -> bool:
        try:
            leaders.append(asyncio.run(_stream_leader(url)))
        except (NatsError, TimeoutError):
            return False
        return bool(leaders[-1])

    wait_until(known, timeout, "the jobs stream to have a leader")
    return leaders[-1]


async def _streams_current(url: str) -> bool:
    nc = await connect(url, "test-cluster-current")
    try:
        for info in await nc.jetstream().streams_info():
            cluster = info.cluster
            if cluster is None or not cluster.leader:
                return False
            if not all(peer.current and not peer.offline for peer in cluster.replicas or ()):
                return False
        return True
    finally:
        await disconnect(nc)


def streams_current(url: str) -> bool:
    """Every stream (and so every bucket) has a leader and every follower is current:
    a node that just restarted has caught up. False while the cluster does not answer."""
    try:
        return asyncio.run(_streams_current(url))
    except (NatsError, TimeoutError):
        return False
