"""`kurrier up --nats-cluster 3`: three real nats-servers whose routes use mutual TLS
from up's own CA. Mail crosses the cluster; a server with another CA's certificate,
or with none, does not join the routes, and so reads nothing of what they carry.

An intruder is a real nats-server on this machine that dials a node's route
port, as another local user could. It trusts up's CA (its own checks pass), so
any refusal is the cluster's. The control intruder holds up's own route
certificate (readable only by up's user): it joins, which shows that the
refused ones would have been seen joining.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kurrier.cli.local_ca import NATS_IDENTITY
from kurrier.cli.nats_server import RouteTls, nats_server_binary

from tests.support.certs import TestCA
from tests.support.processes import free_port, port_open, stop_process, wait_until
from tests.support.relay import UpRelay, documents, route, trusting
from tests.support.sink import Sink


def _route_port(relay: UpRelay, node: str) -> int:
    """The route port up gave node, from its command line (`--cluster nats://host:port`)."""
    argv = Path(f"/proc/{relay.pid(node)}/cmdline").read_bytes().decode().split("\0")
    return int(argv[argv.index("--cluster") + 1].rsplit(":", 1)[1])


def _routes(monitor_port: int) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/routez", timeout=5) as reply:
        routes: list[dict[str, object]] = json.load(reply)["routes"] or []
    return routes


@contextmanager
def _intruder(workdir: Path, target: int, tls: RouteTls | None) -> Iterator[int]:
    """A nats-server dialling the route port target; its monitoring port."""
    workdir.mkdir()
    config = workdir / "nats.conf"
    config.write_text(tls.config() if tls else "")
    monitor, log = free_port(), workdir / "nats.log"
    argv = [
        nats_server_binary(),
        "--config",
        str(config),
        "--addr",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--http_port",
        str(monitor),
        "--server_name",
        workdir.name,
        "--cluster_name",
        "kurrier",
        "--cluster",
        f"nats://127.0.0.1:{free_port()}",
        "--routes",
        f"nats://127.0.0.1:{target}",
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: port_open(monitor), 30, f"{workdir.name} to serve /routez")
        yield monitor
    finally:
        stop_process(process)


def test_only_servers_with_a_certificate_of_ups_ca_join_the_routes(
    tmp_path: Path, sink: Sink
) -> None:
    config = documents(route("to-sink", ["example.com"], sink.port), trusting("127.0.0.0/8"))
    with UpRelay(tmp_path, config, "--nats-cluster", "3") as relay:
        # Streams of 3 replicas on three nodes: every write crosses the routes.
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
            smtp.sendmail("a@client.test", ["b@example.com"], b"Subject: routed\r\n\r\nHi.\r\n")
        wait_until(lambda: len(sink.messages) == 1, 60, "the mail to cross the cluster")

        up_tls = relay.data_dir / "tls"
        ca_file = str(up_tls / "ca.crt")
        target = _route_port(relay, "kurrier-1")
        up_log = tmp_path / "up.log"

        def refusals() -> int:
            return up_log.read_text(errors="replace").count("TLS route handshake error")

        foreign = TestCA(tmp_path / "foreign-ca")
        cert, key = foreign.issue("localhost", "127.0.0.1", peer=True)

        def assert_refused(name: str, tls: RouteTls | None) -> None:
            before = refusals()
            with _intruder(tmp_path / name, target, tls) as monitor:
                # The node names the refusal; the intruder, having dialled, stays alone.
                wait_until(lambda: refusals() > before, 30, f"kurrier-1 to refuse {name}")
                assert _routes(monitor) == []

        assert_refused("foreign", RouteTls(str(cert), str(key), ca_file))
        assert_refused("plaintext", None)

        own = RouteTls(
            str(up_tls / f"{NATS_IDENTITY}.crt"), str(up_tls / f"{NATS_IDENTITY}.key"), ca_file
        )
        with _intruder(tmp_path / "control", target, own) as monitor:
            wait_until(lambda: len(_routes(monitor)) >= 1, 30, "up's own certificate to join")
