"""`kubectl kurrier queue ...` against a real kube-apiserver, as the caller RBAC allows.

The test API server (tests/support/kube.py) has no kubelet and runs no pods:
a queue Pod object is made Running by writing its status, so the plugin
finds it, reads the admin certificate's Secret and asks the API server for a
port-forward, which RBAC decides. No kubelet can answer the forward here, so
what travels through a real forward (the gRPC call) is not tested: the API
server's refusal for want of a node is where the path ends.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kurrier.cli import kubectl_plugin
from kurrier.cli.main import build_parser

from tests.support.kube import Api, TestCluster

NAMESPACE = "kubectl-plugin"
POD = "kurrier-queue-5d9c7-abcde"
SECRET = "kurrier-queue-admin-grpc-tls"
PLUGIN = str(Path(sys.executable).parent / "kubectl-kurrier")


def _created(api: Api, obj: dict[str, Any]) -> None:
    response = api.create(obj, dry_run=False)
    assert response.status in (201, 409), response


def _role(name: str, rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A ServiceAccount with a Role of these rules in the namespace."""
    meta = {"name": name, "namespace": NAMESPACE}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}],
        },
    ]


FIND_QUEUE = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}
READ_CERTIFICATE = {
    "apiGroups": [""],
    "resources": ["secrets"],
    "resourceNames": [SECRET],
    "verbs": ["get"],
}
# kubectl's SPDY forward is a POST (create); a WebSocket one is a GET, which the API
# server authorizes as get and, since Kubernetes 1.35, as create too.
FORWARD = {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]}


@pytest.fixture(scope="module")
def cluster(kube_cluster: TestCluster) -> Iterator[TestCluster]:
    api = kube_cluster.api()
    api.ensure_namespace(NAMESPACE)
    labels = {"app.kubernetes.io/instance": "kurrier", "app.kubernetes.io/component": "queue"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": POD, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "containers": [
                {
                    "name": "queue",
                    "image": "kurrier:test",
                    "ports": [{"name": "grpc", "containerPort": 7070}],
                }
            ]
        },
    }
    _created(api, pod)
    status = api.request(
        "PATCH",
        f"/api/v1/namespaces/{NAMESPACE}/pods/{POD}/status",
        {"status": {"phase": "Running"}},
        content_type="application/merge-patch+json",
    )
    assert status.status == 200, status
    unused = base64.b64encode(b"never read: no forward reaches the queue here").decode()
    _created(
        api,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NAMESPACE},
            "data": {"ca.crt": unused, "tls.crt": unused, "tls.key": unused},
        },
    )
    for name, rules in (
        ("finds-only", [FIND_QUEUE]),
        ("no-forward", [FIND_QUEUE, READ_CERTIFICATE]),
        ("operator", [FIND_QUEUE, READ_CERTIFICATE, FORWARD]),
    ):
        for obj in _role(name, rules):
            _created(api, obj)
    yield kube_cluster


def _kubeconfig(cluster: TestCluster, account: str, directory: Path) -> Path:
    issued = cluster.api().request(
        "POST",
        f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{account}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )
    assert issued.status == 201, issued
    config = json.loads(cluster.kubeconfig.read_text())
    config["users"][0]["user"] = {"token": issued.body["status"]["token"]}
    path = directory / f"{account}.kubeconfig"
    path.write_text(json.dumps(config))
    return path


def _plugin(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PLUGIN, "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_finds_no_queue_where_the_release_is_not(cluster: TestCluster) -> None:
    result = _plugin(cluster.kubeconfig, "-n", "default", "queue", "list")
    assert result.returncode == 1
    assert result.stderr == (
        "kubectl kurrier queue list:"
        " no running queue pod of release 'kurrier' in namespace default\n"
    )


def test_rbac_decides_who_reads_the_certificate_and_who_forwards(
    cluster: TestCluster, tmp_path: Path
) -> None:
    finds_only = _plugin(
        _kubeconfig(cluster, "finds-only", tmp_path), "-n", NAMESPACE, "queue", "list"
    )
    assert finds_only.returncode == 1
    assert f"reading the admin certificate {NAMESPACE}/{SECRET}: 403" in finds_only.stderr

    no_forward = _plugin(
        _kubeconfig(cluster, "no-forward", tmp_path), "-n", NAMESPACE, "queue", "list"
    )
    assert no_forward.returncode == 1
    assert no_forward.stderr == (
        f"kubectl kurrier queue list: port-forward to {NAMESPACE}/{POD}: the API server answered"
        " 403 (RBAC: the caller needs get and create on pods/portforward):"
        f' pods "{POD}" is forbidden: User "system:serviceaccount:{NAMESPACE}:no-forward"'
        f' cannot get resource "pods/portforward" in API group "" in the namespace "{NAMESPACE}"\n'
    )


def test_a_caller_allowed_to_forward_reaches_the_api_servers_forward(
    cluster: TestCluster, tmp_path: Path
) -> None:
    operator = _kubeconfig(cluster, "operator", tmp_path)
    result = _plugin(operator, "-n", NAMESPACE, "-o", "json", "queue", "history", "--rcpt", "a@b.c")
    # Past RBAC, the API server looks for the pod's node to reach its kubelet: there is none.
    assert (result.returncode, result.stderr) == (
        1,
        f"kubectl kurrier queue history: port-forward to {NAMESPACE}/{POD}: the API server"
        f" answered 400: pod {POD} does not have a host assigned\n",
    )


def test_usage_errors_are_caught_before_the_cluster_is_asked(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-kubeconfig"
    held = _plugin(missing, "queue", "hold")
    assert (held.returncode, held.stderr) == (
        2,
        "kubectl kurrier queue hold: give queue ids or --all\n",
    )
    unreadable = _plugin(missing, "queue", "list")
    assert unreadable.returncode == 1
    assert str(missing) in unreadable.stderr


def test_finds_no_queue_of_another_release_nor_one_not_running(
    cluster: TestCluster, tmp_path: Path
) -> None:
    api = cluster.api()
    namespace = "kubectl-plugin-pending"
    api.ensure_namespace(namespace)
    labels = {"app.kubernetes.io/instance": "kurrier", "app.kubernetes.io/component": "queue"}
    # Scheduled nowhere (no node runs here): it stays Pending.
    pending = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kurrier-queue-pending", "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "queue", "image": "kurrier:test"}]},
    }
    _created(api, pending)
    for release, args in (("kurrier", ()), ("mail", ("--release", "mail"))):
        result = _plugin(cluster.kubeconfig, "-n", namespace, *args, "queue", "list")
        assert (result.returncode, result.stderr) == (
            1,
            f"kubectl kurrier queue list: no running queue pod of release {release!r}"
            f" in namespace {namespace}\n",
        )


# What call_queue reads of the admin flags; the plugin reaches the queue itself.
HONOURED = {
    "-h",
    "--help",
    "--state",
    "--domain",
    "--sender",
    "--namespace",
    "--all",
    "--yes",
    "--rcpt",
    "--since",
}
ACTIONS = ("list", "show", "hold", "release", "delete", "retry", "flush", "history", "sites")


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--?[a-z][\w-]*", help_text))


def test_the_plugins_help_lists_no_flag_it_ignores(capsys: pytest.CaptureFixture[str]) -> None:
    for action in ACTIONS:
        with pytest.raises(SystemExit):
            kubectl_plugin.main(["queue", action, "--help"])
        shown = _flags(capsys.readouterr().out)
        assert shown <= HONOURED, (action, shown - HONOURED)
        # `kurrier queue` itself keeps how to reach the queue.
        with pytest.raises(SystemExit):
            build_parser().parse_args(["queue", action, "--help"])
        assert {"--data-dir", "--queue-address", "--json"} <= _flags(capsys.readouterr().out)
    # An ignored flag is not taken silently either.
    refused = _plugin(Path("unused"), "queue", "list", "--data-dir", "/tmp")
    assert refused.returncode == 2
    assert "unrecognized arguments: --data-dir" in refused.stderr


def test_the_release_namespace_and_the_tenant_filter_are_apart() -> None:
    from kurrier.cli.queue_admin import queue_filter

    args = kubectl_plugin.build_parser().parse_args(
        ["-n", "mail", "queue", "list", "--namespace", "team-a"]
    )
    assert args.namespace == "mail"
    assert queue_filter(args).tenant == "team-a"
