"""The envtest-like fixture (tests/support/kube.py) gives a real, working API server (and helm).

kube_cluster is the session's (tests/conftest.py), started by start_test_cluster."""

from __future__ import annotations

import json
import subprocess
import uuid

from tests.support.kube import TestCluster


def test_create_and_get_namespace(kube_cluster: TestCluster) -> None:
    name = f"x-{uuid.uuid4().hex[:8]}"
    created = kube_cluster.api().request(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    assert created.status == 201, created
    assert created.body["metadata"]["uid"]

    got = kube_cluster.api().request("GET", f"/api/v1/namespaces/{name}")
    assert got.status == 200, got
    assert got.body["metadata"]["name"] == name
    assert got.body["metadata"]["uid"] == created.body["metadata"]["uid"]

    missing = kube_cluster.api().request("GET", f"/api/v1/namespaces/{name}-absent")
    assert missing.status == 404, missing


def test_dry_run_configmap_is_not_persisted(kube_cluster: TestCluster) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "dry"},
        "data": {"k": "v"},
    }
    created = kube_cluster.api().request(
        "POST", "/api/v1/namespaces/default/configmaps", body, {"dryRun": "All"}
    )
    assert created.status == 201, created
    assert created.body["data"] == {"k": "v"}

    got = kube_cluster.api().request("GET", "/api/v1/namespaces/default/configmaps/dry")
    assert got.status == 404, got


def test_unknown_token_is_rejected(kube_cluster: TestCluster) -> None:
    response = kube_cluster.api("not-a-valid-token").request("GET", "/api/v1/namespaces")
    assert response.status == 401, response


def test_rbac_denies_service_account_without_roles(kube_cluster: TestCluster) -> None:
    """RBAC is on and ServiceAccount tokens are issued and accepted by the server."""
    admin = kube_cluster.api()
    sa = admin.request(
        "POST",
        "/api/v1/namespaces/default/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}},
    )
    assert sa.status == 201, sa
    issued = admin.request(
        "POST",
        "/api/v1/namespaces/default/serviceaccounts/nobody/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )
    assert issued.status == 201, issued
    sa_token = issued.body["status"]["token"]

    review = admin.request(
        "POST",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": sa_token},
        },
    )
    assert review.status == 201, review
    assert review.body["status"]["authenticated"] is True, review
    assert review.body["status"]["user"]["username"] == "system:serviceaccount:default:nobody"

    denied = kube_cluster.api(sa_token).request("GET", "/api/v1/namespaces")
    assert denied.status == 403, denied


def test_kubeconfig_is_valid_json_for_clients(kube_cluster: TestCluster) -> None:
    config = json.loads(kube_cluster.kubeconfig.read_text())
    assert config["clusters"][0]["cluster"]["server"] == kube_cluster.server
    assert config["users"][0]["user"]["token"] == kube_cluster.token


def test_helm_version_runs(kube_cluster: TestCluster) -> None:
    proc = subprocess.run(
        [str(kube_cluster.bin_dir / "helm"), "version", "--short"],
        capture_output=True,
        text=True,
        timeout=60,
        env=kube_cluster.env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("v3."), proc.stdout


def test_helm_talks_to_the_cluster(kube_cluster: TestCluster) -> None:
    # A namespace of its own: other tests of the session install releases.
    namespace = f"x-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [str(kube_cluster.bin_dir / "helm"), "list", "--namespace", namespace, "--output", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=kube_cluster.env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
