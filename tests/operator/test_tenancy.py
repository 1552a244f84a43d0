"""Namespaces as tenants, end to end: the real API server, the operator with a platform
namespace, ingress taking ServiceAccount tokens, queue and delivery on a real NATS.

Two teams each route all mail (`*`) to their own sink; team-a's route has the
higher priority, so a table merged across namespaces would send team-b's mail
to team-a's sink.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

from tests.ingress.smtp_probe import SmtpProbe, plain
from tests.operator.objects import apply, new_namespace, wait_for_status
from tests.operator.operator_process import OperatorProcess
from tests.support.kube import Api, TestCluster
from tests.support.metrics import value
from tests.support.nats import NatsServer
from tests.support.processes import free_port, kurrier_argv, wait_until
from tests.support.relay import ServiceRelay, route
from tests.support.service_accounts import ingress_args, service_account, token
from tests.support.sink import Sink


def _team_domain(domain: str) -> str:
    return f"""\
apiVersion: kurrier.io/v1alpha1
kind: RelayDomain
metadata: {{name: {domain.replace(".", "-")}}}
spec: {{domain: {domain}, acceptInbound: true}}"""


# team-a's own mail in the test, inbound included, is its quota for the day.
TEAM_A_MESSAGES_PER_DAY = 3


def _platform_policy(team_a: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: kurrier.io/v1alpha1
        kind: RelayPolicy
        metadata: {{name: platform}}
        spec:
          requireTLSForAuth: false
          auth: {{serviceAccountAudience: kurrier}}
          namespaceQuotas:
            - {{namespace: {team_a}, messagesPerDay: {TEAM_A_MESSAGES_PER_DAY}}}""")


def _mail(port: int, tenant_token: str, sender: str, subject: str) -> str:
    """Submit one message with a ServiceAccount token; the reply to the last command."""
    with SmtpProbe(port) as smtp:
        smtp.reply()
        smtp.command("EHLO pod.test")
        assert smtp.command(plain("mailer", tenant_token)).startswith("235")
        mail = smtp.command(f"MAIL FROM:<{sender}>")
        if not mail.startswith("250"):
            return mail.lines[-1]
        rcpt = smtp.command("RCPT TO:<someone@example.com>")
        if not rcpt.startswith("250"):
            return rcpt.lines[-1]
        assert smtp.command("DATA").startswith("354")
        smtp.send(f"From: {sender}\r\nSubject: {subject}\r\n\r\nHi.\r\n.\r\n".encode())
        return smtp.reply().lines[-1]


def _admin(relay: ServiceRelay, *args: str) -> dict[str, Any]:
    """`kurrier queue ARGS --json` of the relay's queue."""
    argv = kurrier_argv("queue", *args, "--json", "--queue-address", relay.queue_address)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def _listing(relay: ServiceRelay, namespace: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = _admin(relay, "list", "--namespace", namespace).get(
        "messages", []
    )
    return messages


def _received_tenant(relay: ServiceRelay, queue_id: str) -> str | None:
    """The tenant in the message's history of its receipt; None before it is published."""
    events = _admin(relay, "history", queue_id).get("events", [])
    received = [e for e in events if e["event"] == "received"]
    return str(received[0]["details"].get("tenant")) if received else None


def _subjects(sink: Sink) -> list[str]:
    return [
        line
        for m in sink.messages
        for line in m.content.decode().split("\r\n")[:40]
        if line.startswith("Subject: ")
    ]


def test_two_teams_each_with_their_own_domains_and_routes(
    tmp_path: Path,
    kube: Api,
    kube_cluster: TestCluster,
    operator_kubeconfig: Path,
    nats_server: NatsServer,
) -> None:
    platform, team_a, team_b = new_namespace(kube), new_namespace(kube), new_namespace(kube)
    submission = free_port()
    flags = ingress_args(kube_cluster, tmp_path, submission)
    tokens = {}
    for team in (team_a, team_b):
        service_account(kube_cluster, "mailer", team)
        tokens[team] = token(kube_cluster, "mailer", ["kurrier"], team)
    with Sink() as sink_a, Sink() as sink_b:
        apply(kube, platform, _platform_policy(team_a))
        apply(kube, team_a, _team_domain("a.test"))
        apply(kube, team_a, route("all-mail", ["*"], sink_a.port, priority=100))
        apply(kube, team_b, _team_domain("b.test"))
        apply(kube, team_b, route("all-mail", ["*"], sink_b.port, priority=10))
        operator = OperatorProcess(
            tmp_path,
            operator_kubeconfig,
            nats_server.url,
            [platform, team_a, team_b],
            "--platform-namespace",
            platform,
        )
        relay = ServiceRelay(
            tmp_path, nats_server.url, metrics=True, service_args={"ingress": flags}
        )
        relay.published = True  # by the operator, before the relay starts
        with operator, relay:
            assert _mail(submission, tokens[team_a], "app@a.test", "from a").startswith("250")
            assert _mail(submission, tokens[team_b], "app@b.test", "from b").startswith("250")
            sink_a.wait_for(1)
            sink_b.wait_for(1)
            refused = _mail(submission, tokens[team_a], "app@b.test", "a as b")
            assert refused.startswith("553 5.7.1"), refused
            # From outside, mail for a.test is team-a's; b.test's goes in its own transaction.
            with SmtpProbe(relay.smtp_port) as smtp:
                smtp.reply()
                smtp.command("EHLO outside.test")
                assert smtp.command("MAIL FROM:<someone@outside.test>").startswith("250")
                assert smtp.command("RCPT TO:<x@a.test>").startswith("250")
                assert smtp.command("RCPT TO:<y@b.test>").startswith("452 4.5.3")
                assert smtp.command("DATA").startswith("354")
                smtp.send(b"Subject: inbound\r\n\r\nHi.\r\n.\r\n")
                assert smtp.reply().startswith("250")

            # team-b claims team-a's domain: told so, and team-a's mail goes on as before.
            apply(kube, team_b, _team_domain("a.test"))
            claim = wait_for_status(kube, "RelayDomain", team_b, "a-test", ready=False)
            [condition] = claim["status"]["conditions"]
            assert condition["reason"] == "Conflict", condition
            assert f"{team_a}/a-test keeps it" in condition["message"]
            assert _mail(submission, tokens[team_a], "app@a.test", "a again").startswith("250")
            refused = _mail(submission, tokens[team_b], "app@a.test", "b as a")
            assert refused.startswith("553 5.7.1"), refused
            sink_a.wait_for(3)

            assert sorted(_subjects(sink_a)) == [
                "Subject: a again",
                "Subject: from a",
                "Subject: inbound",
            ]
            assert _subjects(sink_b) == ["Subject: from b"]
            received = relay.metrics_ports["ingress"]
            assert value(received, "kurrier_messages_received_total", tenant=team_a) == 3
            assert value(received, "kurrier_messages_received_total", tenant=team_b) == 1

            # team-a has sent its quota for the day; team-b goes on.
            refused = _mail(submission, tokens[team_a], "app@a.test", "over quota")
            assert refused.startswith(f"450 4.7.1 Mail quota of namespace {team_a}"), refused

            # team-b's next hop defers: its message waits in the queue, listed as team-b's.
            sink_b.behaviour.outage_phase = "MAIL"
            assert _mail(submission, tokens[team_b], "app@b.test", "waits").startswith("250")
            [waiting] = _listing(relay, team_b)
            assert (waiting["sender"], waiting["tenant"]) == ("app@b.test", team_b)
            assert _listing(relay, team_a) == []
            wait_until(
                lambda: _received_tenant(relay, waiting["queue_id"]) == team_b,
                10,
                "the receipt's history to name team-b",
            )
