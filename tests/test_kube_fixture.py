"""The envtest-like fixture gives a real, working API server (and helm)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kube_fixtures import TestCluster, start_test_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
    with start_test_cluster(tmp_path_factory.mktemp("kube")) as c:
        yield c


def api(
    cluster: TestCluster,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """Call the API server; return (status, decoded JSON body), also for HTTP errors."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{cluster.server}{path}", data=data, method=method)
    request.add_header("Authorization", f"Bearer {cluster.token if token is None else token}")
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30, context=cluster.ssl_context()) as resp:
            status: int = resp.status
            decoded: dict[str, Any] = json.loads(resp.read())
            return status, decoded
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_create_and_get_namespace(cluster: TestCluster) -> None:
    name = f"x-{uuid.uuid4().hex[:8]}"
    status, created = api(
        cluster,
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    assert status == 201, created
    assert created["metadata"]["uid"]

    status, got = api(cluster, "GET", f"/api/v1/namespaces/{name}")
    assert status == 200, got
    assert got["metadata"]["name"] == name
    assert got["metadata"]["uid"] == created["metadata"]["uid"]

    status, missing = api(cluster, "GET", f"/api/v1/namespaces/{name}-absent")
    assert status == 404, missing


def test_dry_run_configmap_is_not_persisted(cluster: TestCluster) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "dry"},
        "data": {"k": "v"},
    }
    status, created = api(cluster, "POST", "/api/v1/namespaces/default/configmaps?dryRun=All", body)
    assert status == 201, created
    assert created["data"] == {"k": "v"}

    status, got = api(cluster, "GET", "/api/v1/namespaces/default/configmaps/dry")
    assert status == 404, got


def test_unknown_token_is_rejected(cluster: TestCluster) -> None:
    status, body = api(cluster, "GET", "/api/v1/namespaces", token="not-a-valid-token")
    assert status == 401, body


def test_rbac_denies_service_account_without_roles(cluster: TestCluster) -> None:
    """RBAC is on and ServiceAccount tokens are issued and accepted by the server."""
    status, sa = api(
        cluster,
        "POST",
        "/api/v1/namespaces/default/serviceaccounts",
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}},
    )
    assert status == 201, sa
    status, issued = api(
        cluster,
        "POST",
        "/api/v1/namespaces/default/serviceaccounts/nobody/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )
    assert status == 201, issued
    sa_token = issued["status"]["token"]

    status, review = api(
        cluster,
        "POST",
        "/apis/authentication.k8s.io/v1/tokenreviews",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": sa_token},
        },
    )
    assert status == 201, review
    assert review["status"]["authenticated"] is True, review
    assert review["status"]["user"]["username"] == "system:serviceaccount:default:nobody"

    status, denied = api(cluster, "GET", "/api/v1/namespaces", token=sa_token)
    assert status == 403, denied


def test_kubeconfig_is_valid_json_for_clients(cluster: TestCluster) -> None:
    config = json.loads(cluster.kubeconfig.read_text())
    assert config["clusters"][0]["cluster"]["server"] == cluster.server
    assert config["users"][0]["user"]["token"] == cluster.token


def test_helm_version_runs(cluster: TestCluster) -> None:
    proc = subprocess.run(
        [str(cluster.bin_dir / "helm"), "version", "--short"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cluster.env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("v3."), proc.stdout


def test_helm_talks_to_the_cluster(cluster: TestCluster) -> None:
    proc = subprocess.run(
        [str(cluster.bin_dir / "helm"), "list", "--all-namespaces", "--output", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cluster.env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
