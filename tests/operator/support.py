"""Running the operator against the test API server, under the chart's own RBAC.

The API client and chart rendering are the chart tests' (tests/chart/support.py);
this adds what operator tests need: a kubeconfig for the chart's operator
ServiceAccount, the operator as a process, and reading status and the table.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from kurrier.core.jetstream import CONFIG_BUCKET, ROUTING_TABLE_KEY, connect, disconnect
from kurrier.operator.cluster_objects import PLURALS
from nats.js.errors import KeyNotFoundError, NotFoundError

from tests.chart.support import Api, Obj, Response, Scenario, by_kind, render
from tests.kube_fixtures import TestCluster
from tests.support.processes import free_port, kurrier_argv, stop_process, wait_until

GROUP = "/apis/kurrier.io/v1alpha1"
RELEASE_NAMESPACE = "kurrier-system"
OPERATOR_ACCOUNT = "kurrier-operator"


def path_of(kind: str, namespace: str, name: str = "") -> str:
    plural = "secrets" if kind == "Secret" else PLURALS[kind]
    base = "/api/v1" if kind == "Secret" else GROUP
    return f"{base}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


def apply(api: Api, namespace: str, document: str | Obj) -> Response:
    """Create the object, or replace the spec/data of an existing one; the server's answer."""
    obj: Obj = yaml.safe_load(document) if isinstance(document, str) else document
    name = obj["metadata"]["name"]
    params = {"fieldValidation": "Strict"}
    created = api.request("POST", path_of(obj["kind"], namespace), obj, params)
    if created.status != 409:
        return created
    changes = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    if obj["kind"] != "Secret":
        # A merge patch would keep list entries and fields the new spec drops.
        current = api.request("GET", path_of(obj["kind"], namespace, name)).body
        current["spec"] = obj["spec"]
        return api.request("PUT", path_of(obj["kind"], namespace, name), current, params)
    return api.request(
        "PATCH",
        path_of("Secret", namespace, name),
        changes,
        params,
        content_type="application/merge-patch+json",
    )


def delete(api: Api, kind: str, namespace: str, name: str) -> None:
    response = api.request("DELETE", path_of(kind, namespace, name))
    assert response.status == 200, response


def new_namespace(api: Api) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    api.ensure_namespace(name)
    return name


def ready_condition(api: Api, kind: str, namespace: str, name: str) -> Obj | None:
    body = api.request("GET", path_of(kind, namespace, name)).body
    conditions = (body.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), None)


def wait_for_status(
    api: Api,
    kind: str,
    namespace: str,
    name: str,
    *,
    ready: bool,
    generation: int = 1,
    timeout: float = 20,
) -> Obj:
    """Poll until the operator wrote Ready=ready for this generation; the object then."""
    found: list[Obj] = []

    def written() -> bool:
        body = api.request("GET", path_of(kind, namespace, name)).body
        status = body.get("status") or {}
        conditions = status.get("conditions") or []
        condition: Obj = next((c for c in conditions if c["type"] == "Ready"), {})
        if status.get("observedGeneration") == generation and condition.get("status") == str(ready):
            found.append(body)
            return True
        return False

    wait_until(written, timeout, f"{kind} {namespace}/{name} Ready={ready} at gen {generation}")
    return found[0]


def events_of(api: Api, namespace: str, name: str) -> list[Obj]:
    response = api.request(
        "GET",
        f"/api/v1/namespaces/{namespace}/events",
        params={"fieldSelector": f"involvedObject.name={name}"},
    )
    items: list[Obj] = response.body["items"]
    return items


def table_rows(cluster: TestCluster, kind: str, namespace: str) -> tuple[list[str], list[Any]]:
    """What `kubectl get` prints: the server-side Table of the kind (columns, cells)."""
    request = urllib.request.Request(cluster.server + path_of(kind, namespace))
    request.add_header("Authorization", f"Bearer {cluster.token}")
    request.add_header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    with urllib.request.urlopen(request, timeout=30, context=cluster.ssl_context()) as resp:
        table = json.loads(resp.read())
    return [c["name"] for c in table["columnDefinitions"]], [r["cells"] for r in table["rows"]]


async def _routing_table(nats_url: str) -> dict[str, Any] | None:
    nc = await connect(nats_url, "test-inspector")
    try:
        kv = await nc.jetstream().key_value(CONFIG_BUCKET)
        entry = await kv.get(ROUTING_TABLE_KEY)
    except (KeyNotFoundError, NotFoundError):
        return None
    finally:
        await disconnect(nc)
    loaded: dict[str, Any] = json.loads(entry.value or b"null")
    return loaded


def routing_table(nats_url: str) -> dict[str, Any] | None:
    """The published table as JSON, or None before the first publication."""
    return asyncio.run(_routing_table(nats_url))


def wait_for_table(
    nats_url: str, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20
) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def published() -> bool:
        table = routing_table(nats_url)
        if table is not None and condition(table):
            found.append(table)
            return True
        return False

    wait_until(published, timeout, what)
    return found[0]


def route_names(table: dict[str, Any]) -> list[str]:
    return [r["name"] for r in table["routes"]]


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
        self, workdir: Path, kubeconfig: Path, nats_url: str, namespaces: Sequence[str]
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
