"""`kurrier up`'s embedded nats-server: how it is started, and who may log in."""

from __future__ import annotations

import asyncio
import os
import random
import smtplib
import socket
import subprocess
from pathlib import Path

import nats
import nats.errors
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kurrier.cli import nats_server
from kurrier.cli.main import build_parser
from kurrier.cli.nats_server import nats_server_env
from kurrier.cli.up import NATS_USERS_DIR, UpSettings, _LocalRelay, metrics_ports
from kurrier.core.grpc_tls import QueueTls
from kurrier.core.jetstream import BODIES_STREAM, connect, disconnect
from kurrier.core.nats_access import COMPONENTS
from kurrier.core.settings import NATS_PASSWORD_FILE, NATS_USER

from tests.support.metrics import value
from tests.support.processes import free_ports, kurrier_argv, wait_until, worker_port_range
from tests.support.relay import UpRelay, documents, inbound_domain, route, trusting
from tests.support.sink import Sink


def test_nats_server_gets_a_quarter_of_the_cpus_as_go_processors() -> None:
    cpus = len(os.sched_getaffinity(0))
    env = nats_server_env({"PATH": "/usr/bin"})
    assert env == {"PATH": "/usr/bin", "GOMAXPROCS": str(max(1, cpus // 4))}


def test_a_gomaxprocs_the_user_set_is_kept() -> None:
    assert nats_server_env({"GOMAXPROCS": "7"})["GOMAXPROCS"] == "7"


def test_up_starts_nats_server_with_that_environment(tmp_path: Path, sink: Sink) -> None:
    config = documents(
        inbound_domain("example.com"), route("to-sink", ["example.com"], sink.port), trusting()
    )
    with UpRelay(tmp_path, config) as relay:
        environ = Path(f"/proc/{relay.pid('nats-server')}/environ").read_bytes()
    variables = dict(entry.split(b"=", 1) for entry in environ.split(b"\0") if entry)
    assert variables[b"GOMAXPROCS"] == nats_server_env()["GOMAXPROCS"].encode()
    # Everything else is passed on as `kurrier up` got it.
    assert variables[b"PATH"] == os.environ["PATH"].encode()


def test_each_child_serves_its_metrics_on_its_own_port(tmp_path: Path, sink: Sink) -> None:
    base = free_ports(3)
    config = documents(inbound_domain("example.com"), route("to-sink", ["example.com"], sink.port))
    with UpRelay(tmp_path, config, "--metrics-base-port", str(base)) as relay:
        ports = {"ingress": base, "queue": base + 1, "delivery": base + 2}
        listed = ",".join(f"{name}:{port}" for name, port in ports.items())
        assert f" metrics={listed}" in relay.ready_line
        assert relay.state["metrics"] == {n: f"127.0.0.1:{p}" for n, p in ports.items()}

        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
            smtp.sendmail("a@client.test", ["b@example.com"], b"Subject: hi\r\n\r\nHello.\r\n")
        sink.wait_for(1)
        # Each port is its child's: each counts its own step of the message.
        assert value(ports["ingress"], "kurrier_messages_received_total") == 1
        assert value(ports["queue"], "kurrier_messages_queued_total") == 1
        wait_until(
            lambda: value(ports["delivery"], "kurrier_recipients_delivered_total") == 1,
            10,
            "delivery to count the recipient",
        )


def test_up_refuses_to_start_when_a_metrics_port_is_taken(tmp_path: Path) -> None:
    base = free_ports(3)
    config = tmp_path / "resources.yaml"
    config.write_text(documents(inbound_domain("example.com")))
    with socket.create_server(("127.0.0.1", base + 1)):
        done = subprocess.run(
            kurrier_argv(
                "up",
                "--config",
                str(config),
                "--data-dir",
                str(tmp_path / "data"),
                "--metrics-base-port",
                str(base),
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert f"metrics port(s) {base + 1} in use" in done.stderr
    assert not (tmp_path / "data").exists()  # nothing was started


def _up_settings(*flags: str) -> UpSettings:
    args = build_parser().parse_args(["up", *flags])
    return UpSettings(
        config=args.config,
        kubeconfig=args.kubeconfig,
        namespaces=(),
        data_dir=Path("/unused"),
        nats_cluster=args.nats_cluster,
        passed_on={},
        metrics_base_port=args.metrics_base_port,
    )


def test_metrics_ports_follow_the_children_up_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    here = str(Path(__file__))
    assert metrics_ports(_up_settings("--config", here)) == {
        "ingress": 9464,
        "queue": 9465,
        "delivery": 9466,
    }
    assert metrics_ports(
        _up_settings("--kubeconfig", here, "--nats-cluster", "3", "--metrics-base-port", "9000")
    ) == {
        "ingress": 9000,
        "queue-1": 9001,
        "delivery-1": 9002,
        "queue-2": 9003,
        "delivery-2": 9004,
        "operator": 9005,
    }
    assert metrics_ports(_up_settings("--config", here, "--metrics-base-port", "off")) == {}
    monkeypatch.setenv("KURRIER_METRICS_BASE_PORT", "off")
    assert metrics_ports(_up_settings("--config", here)) == {}


class _OffersFirst:
    """random, for free_port: offers these ports first, in this order, then any."""

    def __init__(self, *ports: int) -> None:
        self._offers = list(ports)

    def randrange(self, start: int, stop: int) -> int:
        return self._offers.pop(0) if self._offers else random.randrange(start, stop)


def test_no_child_gets_a_port_up_was_asked_to_listen_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """up picks its children's ports before ingress binds SMTP: a pick of the SMTP
    port would leave ingress unable to bind and up never ready."""
    smtp, submission, metrics = free_ports(1), free_ports(1), free_ports(6)
    monkeypatch.setattr(nats_server, "random", _OffersFirst(smtp, submission, metrics + 2))
    # As in up's own process, which does not know what this one handed out.
    monkeypatch.setattr(nats_server, "_handed_out", set())
    settings = UpSettings(
        config=Path(__file__),
        kubeconfig=None,
        namespaces=(),
        data_dir=tmp_path,
        nats_cluster=3,
        passed_on={"smtp": f"127.0.0.1:{smtp}", "submission": f"127.0.0.1:{submission}"},
        metrics_base_port=metrics,
    )
    relay = _LocalRelay(settings)
    taken = {smtp, submission, *range(metrics, metrics + 5)}
    picked = {int(listen.rsplit(":", 1)[1]) for listen in relay.queue_listens}
    assert len(picked) == 2 and not picked & taken, (picked, taken)


def test_ports_are_picked_from_the_range_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(nats_server.PORT_RANGE_VARIABLE, "20000-20010")
    monkeypatch.setattr(nats_server, "_handed_out", set())
    picked = {nats_server.free_port() for _ in range(5)}
    assert len(picked) == 5 and all(20000 <= port < 20010 for port in picked), picked
    # Two workers' ranges do not overlap and together stay within the range.
    assert worker_port_range(0, 2) == (20000, 20005)
    assert worker_port_range(1, 2) == (20005, 20010)
    monkeypatch.setenv(nats_server.PORT_RANGE_VARIABLE, "20010-20000")
    with pytest.raises(ValueError, match="is not LOW-HIGH"):
        nats_server.free_port()


def test_up_runs_nats_with_a_login_per_component(tmp_path: Path, sink: Sink) -> None:
    """Each child logs in as its own component with a password only up's user can read;
    without one NATS is closed, and ingress's login reaches no message body."""
    config = documents(
        inbound_domain("example.com"), route("to-sink", ["example.com"], sink.port), trusting()
    )
    with UpRelay(tmp_path, config) as relay:
        bare_url = str(relay.state["nats_url"])
        users = relay.data_dir / NATS_USERS_DIR
        for child in ("queue", "delivery", "ingress"):
            environ = Path(f"/proc/{relay.pid(child)}/environ").read_bytes()
            variables = dict(entry.split(b"=", 1) for entry in environ.split(b"\0") if entry)
            assert variables[NATS_USER.variable.encode()] == child.encode()
            assert variables[NATS_PASSWORD_FILE.variable.encode()] == str(users / child).encode()
        passwords = {user: (users / user).read_text() for user in COMPONENTS}
        assert len(set(passwords.values())) == len(COMPONENTS)
        assert all(len(password) >= 32 for password in passwords.values())
        private = [users / user for user in COMPONENTS] + [relay.data_dir / "nats-server.conf"]
        assert {oct(path.stat().st_mode & 0o777) for path in private} == {"0o600"}
        assert oct(users.stat().st_mode & 0o777) == "0o700"

        async def check() -> None:
            with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
                await nats.connect(bare_url, allow_reconnect=False, max_reconnect_attempts=0)
            nc = await connect(bare_url, "test-ingress", "ingress", passwords["ingress"])
            try:
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.jetstream(timeout=1).stream_info(BODIES_STREAM)
            finally:
                await disconnect(nc)

        asyncio.run(check())
    assert "Publish Violation" in (tmp_path / "up.log").read_text()


def test_ready_means_the_queue_already_takes_calls(tmp_path: Path, sink: Sink) -> None:
    """Ingress greets as soon as its port is open; `kurrier ready` waits for the queue too,
    so the first message is not held waiting for a queue still starting."""
    config = documents(route("to-sink", ["example.com"], sink.port), trusting())
    with UpRelay(tmp_path, config) as relay:
        tls = QueueTls(**relay.state["queue_tls"])  # type: ignore[arg-type]
        address = str(relay.state["queue_address"])

        async def health() -> int:
            async with tls.channel(address) as channel:
                # No wait_for_ready: a queue not listening yet fails this at once.
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            return int(reply.status)

        assert asyncio.run(health()) == health_pb2.HealthCheckResponse.SERVING
