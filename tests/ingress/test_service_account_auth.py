"""Kubernetes ServiceAccount tokens as SMTP passwords, against a real kube-apiserver.

Ingress runs with nothing but a ServiceAccount token allowed to create
TokenReviews (the RBAC docs/security.md asks for), so this also proves that
grant is enough.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.ingress.smtp_probe import SmtpProbe, plain
from tests.support.kube import TestCluster
from tests.support.nats import NatsServer
from tests.support.processes import free_port, wait_until
from tests.support.relay import ServiceRelay, documents, inbound_domain, route
from tests.support.service_accounts import ingress_args, service_account, token

MAILER = "system:serviceaccount:default:mailer"


def _auth(relay: ServiceRelay, submission: int, token: str, sender: str) -> tuple[str, str]:
    """(the AUTH reply, the MAIL reply) of a fresh session."""
    with SmtpProbe(submission) as smtp:
        smtp.reply()
        smtp.command("EHLO pod.test")
        auth = smtp.command(plain("mailer", token)).lines[-1]
        return auth, smtp.command(f"MAIL FROM:<{sender}>").lines[-1]


def test_service_account_tokens(
    tmp_path: Path, kube_cluster: TestCluster, nats_server: NatsServer
) -> None:
    submission = free_port()
    flags = ingress_args(kube_cluster, tmp_path, submission)
    token_file = tmp_path / "ingress-token"
    service_account(kube_cluster, "mailer")
    mailer = token(kube_cluster, "mailer", ["kurrier"])
    wrong_audience = token(kube_cluster, "mailer")
    relay = ServiceRelay(
        tmp_path,
        nats_server.url,
        service_args={"ingress": [*flags, "--token-cache-ttl", "1s"]},
    )
    policy = textwrap.dedent(f"""\
        apiVersion: kurrier.io/v1alpha1
        kind: RelayPolicy
        metadata: {{name: apps}}
        spec:
          requireTLSForAuth: false
          auth: {{serviceAccountAudience: kurrier}}
          senderRules: [{{identity: "{MAILER}", domains: [apps.test]}}]""")
    relay.publish(documents(inbound_domain("example.com"), route("r", ["*"], 9), policy))
    with relay:
        assert _auth(relay, submission, mailer, "app@apps.test") == (
            "235 2.7.0 Authentication successful",
            "250 2.1.0 Ok",
        )
        auth, mail = _auth(relay, submission, mailer, "app@other.test")
        assert mail.startswith("553 5.7.1"), "sender rules apply to the ServiceAccount"
        auth, _ = _auth(relay, submission, wrong_audience, "app@apps.test")
        assert auth.startswith("535 5.7.8"), "a token for another audience is refused"

        deleted = kube_cluster.api().request(
            "DELETE", "/api/v1/namespaces/default/serviceaccounts/mailer"
        )
        assert deleted.status == 200, deleted
        # Revoked: refused once the short positive cache has expired.
        wait_until(
            lambda: _auth(relay, submission, mailer, "app@apps.test")[0].startswith("535 5.7.8"),
            30,
            "the revoked token to be refused",
        )
    log = (tmp_path / "ingress.log").read_text()
    assert mailer not in log and token_file.read_text() not in log, "a token was logged"
