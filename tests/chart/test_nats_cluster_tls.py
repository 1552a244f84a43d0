"""The bundled NATS cluster as the chart renders it: three real nats-servers that route to
each other over mutual TLS with the chart's certificate, and a server with another
CA's certificate, or none, that does not get in.

Each server runs the rendered configuration unchanged but for its paths, in a
network namespace of its own as in a pod (tests/support/netns.py), listening
where the chart says. The cluster DNS's only answer it needs, each pod's name
under the headless Service, comes from an /etc/hosts bind-mounted for the
server alone (a mount namespace of its own): the routes dial those names and
check the certificate against them, as in a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from kurrier.cli.nats_server import RouteTls, nats_server_binary

from tests.chart.rendered_nats import MONITOR_PORT, lay_out, render_nats
from tests.support.certs import TestCA
from tests.support.netns import Host, TestNetwork
from tests.support.processes import wait_until

HEADLESS = "kurrier-nats-headless"
NODES = [f"kurrier-nats-{index}" for index in range(3)]


def _monitor(host: Host, path: str) -> Any:
    """A monitoring endpoint, read from inside the pod (it listens on 127.0.0.1 there)."""

    def read() -> Any:
        url = f"http://127.0.0.1:{MONITOR_PORT}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return json.load(reply)
        except OSError:
            return None

    return host.call(read)


def _route_names(host: Host) -> set[str]:
    routez = _monitor(host, "/routez") or {}
    return {route["remote_name"] for route in routez.get("routes") or []}


def _routes_to(host: Host, names: set[str]) -> Callable[[], bool]:
    return lambda: _route_names(host) == names


def _refused_since(log: Path, count: int) -> Callable[[], bool]:
    """Whether the server logged a refused route handshake since it had logged count."""
    return lambda: log.read_text().count("TLS route handshake error") > count


def _meta_group_ready(host: Host) -> bool:
    """JetStream's meta group, as host sees it, has a leader and all three peers."""
    meta = (_monitor(host, "/jsz") or {}).get("meta_cluster") or {}
    return meta.get("leader") is not None and meta.get("cluster_size") == 3


@contextmanager
def _server(host: Host, hosts_file: Path, argv: list[str], name: str, log: Path) -> Iterator[None]:
    """argv run in host, with hosts_file as its /etc/hosts and SERVER_NAME name."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            host.argv(
                [
                    *("unshare", "--mount", "--propagation", "private"),
                    *("sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts_file)),
                    *argv,
                ]
            ),
            env={**os.environ, "SERVER_NAME": name},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        yield
    finally:
        process.kill()
        process.wait()


def test_the_rendered_cluster_routes_over_tls_and_keeps_a_foreign_server_out(
    helm_bin: Path, tmp_path: Path
) -> None:
    nats = render_nats(helm_bin, tmp_path, {"replicas": 3})
    with TestNetwork(["n0", "n1", "n2", "intruder"]) as network, ExitStack() as running:
        pods = [network.hosts[f"n{index}"] for index in range(3)]
        intruder = network.hosts["intruder"]
        hosts_file = tmp_path / "hosts"
        hosts_file.write_text(
            "127.0.0.1 localhost\n"
            + "".join(
                f"{pod.address} {name}.{HEADLESS}\n" for pod, name in zip(pods, NODES, strict=True)
            )
        )
        for pod, name in zip(pods, NODES, strict=True):
            laid_out = lay_out(nats, tmp_path / name, own_network=True)
            argv = [nats_server_binary(), "--config", str(laid_out.config)]
            running.enter_context(_server(pod, hosts_file, argv, name, tmp_path / f"{name}.log"))
        # Every server reaches the other two over the routes, and JetStream's meta
        # group, whose Raft traffic the routes carry, has its three peers and a leader.
        for pod, name in zip(pods, NODES, strict=True):
            wait_until(_routes_to(pod, set(NODES) - {name}), 60, f"{name}'s routes")
        # A leader is elected by two of the three: the third peer may join the
        # group a moment later, so the size is waited for too.
        wait_until(
            lambda: _meta_group_ready(pods[0]),
            60,
            "a JetStream meta group of three peers with a leader",
        )

        def intruding(name: str, tls: RouteTls | None) -> contextlib.AbstractContextManager[None]:
            directory = tmp_path / name
            directory.mkdir()
            config = directory / "nats.conf"
            config.write_text(tls.config() if tls else "")
            argv = [
                *(nats_server_binary(), "--config", str(config)),
                *("--http_port", str(MONITOR_PORT), "--server_name", name),
                *("--cluster_name", "kurrier", "--cluster", "nats://0.0.0.0:6222"),
                *("--routes", f"nats://{NODES[0]}.{HEADLESS}:6222"),
            ]
            return _server(intruder, hosts_file, argv, name, directory / "log")

        # Trusting the chart's CA, so every refusal is the cluster's.
        ca = tmp_path / NODES[0] / "tls" / "ca.crt"
        foreign = TestCA(tmp_path / "foreign-ca")
        cert, key = foreign.issue(f"intruder.{HEADLESS}", peer=True)
        node_log = tmp_path / f"{NODES[0]}.log"
        for name, tls in (
            ("foreign", RouteTls(str(cert), str(key), str(ca))),
            ("plaintext", None),
        ):
            before = node_log.read_text().count("TLS route handshake error")
            with intruding(name, tls):
                wait_until(
                    _refused_since(node_log, before), 30, f"{NODES[0]} to refuse the {name} one"
                )
                assert _route_names(intruder) == set()
                assert _route_names(pods[0]) == set(NODES[1:])
        # The control: the chart's own certificate joins, so a join would have been seen.
        own = tmp_path / NODES[0] / "tls"
        with intruding("control", RouteTls(str(own / "tls.crt"), str(own / "tls.key"), str(ca))):
            wait_until(lambda: NODES[0] in _route_names(intruder), 30, "the control to join")
