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

MAILER = "system:serviceaccount:default:mailer"


def _create(cluster: TestCluster, path: str, body: dict[str, object]) -> None:
    created = cluster.api().request("POST", path, body)
    assert created.status == 201, created


def _service_account(cluster: TestCluster, name: str) -> None:
    _create(
        cluster,
        "/api/v1/namespaces/default/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
    )


def _token(cluster: TestCluster, name: str, audiences: list[str] | None = None) -> str:
    spec = {"audiences": audiences} if audiences else {}
    issued = cluster.api().request(
        "POST",
        f"/api/v1/namespaces/default/serviceaccounts/{name}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
    )
    assert issued.status == 201, issued
    return str(issued.body["status"]["token"])


def _ingress_identity(cluster: TestCluster, workdir: Path) -> Path:
    """A ServiceAccount that may create TokenReviews and nothing else; its token file."""
    _service_account(cluster, "kurrier-ingress")
    rbac = "/apis/rbac.authorization.k8s.io/v1"
    _create(
        cluster,
        f"{rbac}/clusterroles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "kurrier-tokenreview"},
            "rules": [
                {
                    "apiGroups": ["authentication.k8s.io"],
                    "resources": ["tokenreviews"],
                    "verbs": ["create"],
                }
            ],
        },
    )
    _create(
        cluster,
        f"{rbac}/clusterrolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kurrier-tokenreview"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "kurrier-tokenreview",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": "kurrier-ingress", "namespace": "default"}
            ],
        },
    )
    token_file = workdir / "ingress-token"
    token_file.write_text(_token(cluster, "kurrier-ingress"))
    return token_file


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
    token_file = _ingress_identity(kube_cluster, tmp_path)
    _service_account(kube_cluster, "mailer")
    token = _token(kube_cluster, "mailer", ["kurrier"])
    wrong_audience = _token(kube_cluster, "mailer")
    submission = free_port()
    relay = ServiceRelay(
        tmp_path,
        nats_server.url,
        service_args={
            "ingress": [
                "--submission",
                f"127.0.0.1:{submission}",
                "--kube-api-server",
                kube_cluster.server,
                "--kube-token-file",
                str(token_file),
                "--kube-ca-file",
                str(kube_cluster.ca_file),
                "--token-cache-ttl",
                "1s",
            ]
        },
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
        assert _auth(relay, submission, token, "app@apps.test") == (
            "235 2.7.0 Authentication successful",
            "250 2.1.0 Ok",
        )
        auth, mail = _auth(relay, submission, token, "app@other.test")
        assert mail.startswith("553 5.7.1"), "sender rules apply to the ServiceAccount"
        auth, _ = _auth(relay, submission, wrong_audience, "app@apps.test")
        assert auth.startswith("535 5.7.8"), "a token for another audience is refused"

        deleted = kube_cluster.api().request(
            "DELETE", "/api/v1/namespaces/default/serviceaccounts/mailer"
        )
        assert deleted.status == 200, deleted
        # Revoked: refused once the short positive cache has expired.
        wait_until(
            lambda: _auth(relay, submission, token, "app@apps.test")[0].startswith("535 5.7.8"),
            30,
            "the revoked token to be refused",
        )
    log = (tmp_path / "ingress.log").read_text()
    assert token not in log and token_file.read_text() not in log, "a token was logged"
