"""ServiceAccounts on the test API server: SMTP senders' tokens, and ingress's own identity."""

from __future__ import annotations

from pathlib import Path

from tests.support.kube import TestCluster

INGRESS_ACCOUNT = "kurrier-ingress"
_RBAC = "/apis/rbac.authorization.k8s.io/v1"


def _create(cluster: TestCluster, path: str, body: dict[str, object]) -> None:
    """Create an object; one the session made before (409) is as good."""
    created = cluster.api().request("POST", path, body)
    assert created.status in (201, 409), created


def service_account(cluster: TestCluster, name: str, namespace: str = "default") -> None:
    _create(
        cluster,
        f"/api/v1/namespaces/{namespace}/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
    )


def token(
    cluster: TestCluster, name: str, audiences: list[str] | None = None, namespace: str = "default"
) -> str:
    """A TokenRequest token of the ServiceAccount, for the audiences (default: the API's)."""
    spec = {"audiences": audiences} if audiences else {}
    issued = cluster.api().request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
    )
    assert issued.status == 201, issued
    return str(issued.body["status"]["token"])


def ingress_identity(cluster: TestCluster, workdir: Path) -> Path:
    """A ServiceAccount that may create TokenReviews and nothing else (the RBAC
    docs/security.md asks ingress for); its token file."""
    service_account(cluster, INGRESS_ACCOUNT)
    _create(
        cluster,
        f"{_RBAC}/clusterroles",
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
        f"{_RBAC}/clusterrolebindings",
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
                {"kind": "ServiceAccount", "name": INGRESS_ACCOUNT, "namespace": "default"}
            ],
        },
    )
    token_file = workdir / "ingress-token"
    token_file.write_text(token(cluster, INGRESS_ACCOUNT))
    return token_file


def ingress_args(cluster: TestCluster, workdir: Path, submission: int) -> list[str]:
    """ingress's flags for a submission port that takes ServiceAccount tokens."""
    return [
        "--submission",
        f"127.0.0.1:{submission}",
        "--kube-api-server",
        cluster.server,
        "--kube-token-file",
        str(ingress_identity(cluster, workdir)),
        "--kube-ca-file",
        str(cluster.ca_file),
    ]
