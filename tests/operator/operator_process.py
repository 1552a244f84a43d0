"""The operator as the chart runs it: its ServiceAccount, the chart's RBAC, `kurrier operator`.

Every operator a test starts authenticates with a TokenRequest token of the
chart's operator ServiceAccount, bound by the roles the chart renders.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests.support.chart import Scenario, by_kind, render
from tests.support.kube import Api, TestCluster
from tests.support.processes import free_port, kurrier_argv, stop_process, wait_until

RELEASE_NAMESPACE = "kurrier-system"
OPERATOR_ACCOUNT = "kurrier-operator"


def install_operator_rbac(api: Api, helm_bin: Path, workdir: Path, scenario: Scenario) -> None:
    """Apply the operator's ServiceAccount, roles and bindings exactly as the chart renders them."""
    objects = render(helm_bin, scenario, workdir, namespace=RELEASE_NAMESPACE)
    api.ensure_namespace(RELEASE_NAMESPACE)
    for namespace in scenario.values.get("operator", {}).get("namespaces", []):
        api.ensure_namespace(namespace)
    wanted = [
        o
        for o in objects
        if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
        or (o["kind"] == "ServiceAccount" and o["metadata"]["name"] == OPERATOR_ACCOUNT)
    ]
    assert by_kind(wanted, "ServiceAccount"), "the chart renders no operator ServiceAccount"
    for obj in wanted:
        response = api.create(obj, dry_run=False)
        assert response.status in (201, 409), response


def service_account_kubeconfig(cluster: TestCluster, api: Api, path: Path) -> Path:
    """A kubeconfig with a TokenRequest token of the chart's operator ServiceAccount."""
    issued = api.request(
        "POST",
        f"/api/v1/namespaces/{RELEASE_NAMESPACE}/serviceaccounts/{OPERATOR_ACCOUNT}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )
    assert issued.status == 201, issued
    config = json.loads(cluster.kubeconfig.read_text())
    config["users"][0]["user"] = {"token": issued.body["status"]["token"]}
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class OperatorProcess:
    """`kurrier operator` as its container runs it; ready once /healthz says the table is out."""

    def __init__(
        self,
        workdir: Path,
        kubeconfig: Path,
        nats_url: str,
        namespaces: Sequence[str],
        *flags: str,
    ) -> None:
        self.workdir = workdir
        self.health_port = free_port()
        self.argv = kurrier_argv(
            "operator",
            "--kubeconfig",
            str(kubeconfig),
            "--nats-url",
            nats_url,
            "--namespaces",
            ",".join(namespaces),
            "--metrics-listen",
            f"127.0.0.1:{self.health_port}",
            *flags,
        )
        self.log_path = workdir / f"operator-{self.health_port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def __enter__(self) -> OperatorProcess:
        self.log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=self.log)
        process = self.process
        started = time.monotonic()

        def up() -> bool:
            assert process.poll() is None, f"the operator exited; see {self.log_path}"
            return self.healthy()

        wait_until(up, 60, f"the operator to publish its first table (log: {self.log_path})")
        self.startup_seconds = time.monotonic() - started
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        code = stop_process(self.process)
        assert code == 0, f"the operator did not stop cleanly ({code}): {self.log_path}"
        self.log.close()
