"""Kurrier's objects on the test API server, and what the operator writes back to them.

Create or replace them (:func:`apply`), delete them, wait for the Ready
condition the operator sets, read their events and the Table `kubectl get` shows.
"""

from __future__ import annotations

import uuid
from typing import Any

import yaml
from kurrier.operator.cluster_objects import PLURALS

from tests.support.kube import Api, Obj, Response, TestCluster
from tests.support.processes import wait_until

GROUP = "/apis/kurrier.io/v1alpha1"


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


def wait_for_status(
    api: Api,
    kind: str,
    namespace: str,
    name: str,
    *,
    ready: bool,
    generation: int = 1,
    timeout: float = 20,
    condition: str = "Ready",
    reason: str | None = None,
) -> Obj:
    """Poll until the operator wrote condition=ready (with reason, if given) for this
    generation; the object then."""
    found: list[Obj] = []

    def written() -> bool:
        body = api.request("GET", path_of(kind, namespace, name)).body
        status = body.get("status") or {}
        conditions = status.get("conditions") or []
        written: Obj = next((c for c in conditions if c["type"] == condition), {})
        if (
            status.get("observedGeneration") == generation
            and written.get("status") == str(ready)
            and reason in (None, written.get("reason"))
        ):
            found.append(body)
            return True
        return False

    wait_until(
        written, timeout, f"{kind} {namespace}/{name} {condition}={ready} at gen {generation}"
    )
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
    as_table = "application/json;as=Table;v=v1;g=meta.k8s.io"
    response = cluster.api().request("GET", path_of(kind, namespace), accept=as_table)
    assert response.status == 200, response
    table = response.body
    return [c["name"] for c in table["columnDefinitions"]], [r["cells"] for r in table["rows"]]
