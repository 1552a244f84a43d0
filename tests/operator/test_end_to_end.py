"""`kurrier up --kubeconfig`: a running relay routes mail by the cluster's RelayRoutes.

The relay's operator child runs with the chart's operator ServiceAccount
token; the test edits resources as an admin would, with the API server.
"""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.operator.objects import apply, delete, wait_for_status
from tests.operator.published_table import route_names, wait_for_table
from tests.support.kube import Api
from tests.support.metrics import value
from tests.support.processes import free_ports, kurrier_argv, wait_until
from tests.support.relay import UpRelay, route, trusting
from tests.support.sink import Sink


def _send(relay: UpRelay, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as client:
        client.sendmail(
            "sender@client.test",
            ["rcpt@example.com"],
            f"From: sender@client.test\r\nTo: rcpt@example.com\r\nSubject: {subject}\r\n"
            "\r\nHi.\r\n",
        )


def _wait_until_services_use(relay: UpRelay, revision: int) -> None:
    """Ingress and delivery both swapped in this table revision (or a later one)."""
    wait_until(
        lambda: min(relay.table_revision_in_use(s) for s in ("ingress", "delivery")) >= revision,
        10,
        f"ingress and delivery to use routing table revision {revision}",
    )


def test_apply_route_send_change_route_send_delete_route(
    kube: Api, operator_kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    with Sink() as first, Sink() as second:
        apply(kube, namespace, trusting("127.0.0.0/8"))
        apply(kube, namespace, route("mail", ["example.com"], first.port))
        source = ("--kubeconfig", str(operator_kubeconfig), "--namespace", namespace)
        base = free_ports(4)
        with UpRelay(tmp_path, None, *source, "--metrics-base-port", str(base)) as relay:
            # The operator serves its metrics on the last port; up's readiness waited on it.
            assert relay.ready_line.rstrip().endswith(f",operator:{base + 3}")
            assert value(base + 3, "kurrier_nats_connected") == 1
            body = wait_for_status(kube, "RelayRoute", namespace, "mail", ready=True)
            _wait_until_services_use(relay, body["status"]["tableRevision"])
            _send(relay, "to the first sink")
            [received] = first.wait_for(1)
            assert b"Subject: to the first sink" in received.content

            apply(kube, namespace, route("mail", ["example.com"], second.port))
            body = wait_for_status(kube, "RelayRoute", namespace, "mail", ready=True, generation=2)
            _wait_until_services_use(relay, body["status"]["tableRevision"])
            _send(relay, "to the second sink")
            [received] = second.wait_for(1)
            assert b"Subject: to the second sink" in received.content
            assert len(first.messages) == 1

            delete(kube, "RelayRoute", namespace, "mail")
            table = wait_for_table(relay.nats_url, lambda t: route_names(t) == [], "no routes")
            _wait_until_services_use(relay, table["revision"])
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                _send(relay, "to nowhere")
            [(code, reply)] = refused.value.recipients.values()
            assert code == 451, reply


def test_up_refuses_a_cluster_it_cannot_use(tmp_path: Path) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text('{"apiVersion": "v1", "kind": "Config", "current-context": "none"}')
    result = subprocess.run(
        kurrier_argv("up", "--kubeconfig", str(broken), "--data-dir", str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"kurrier up: {broken}: not a usable kubeconfig" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "one of the arguments --config --kubeconfig is required"),
        (("--config", "{file}", "--kubeconfig", "{file}"), "not allowed with argument"),
        (("--config", "{file}", "--namespace", "team-a"), "--namespace needs --kubeconfig"),
    ],
)
def test_up_takes_exactly_one_source(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    existing = tmp_path / "any.yaml"
    existing.write_text("")
    argv = [arg.format(file=existing) for arg in args]
    result = subprocess.run(kurrier_argv("up", *argv), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
