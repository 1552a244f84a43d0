"""What kopf watches for the operator: the three kinds and Secrets, into indices.

kopf fills every index from its initial listing before it calls any other
handler, so the first event the reconciler hears of comes with a complete
view of the cluster. The handlers only index and wake the reconciler; no
annotations, finalizers or handler state are written to the objects.
"""

from __future__ import annotations

from typing import Any

import kopf
from kurrier.core.resources import API_GROUP
from kurrier.operator.apiserver import credentials
from kurrier.operator.cluster_objects import PLURALS, Key, ObservedObject, StoredSecret
from kurrier.operator.crds import VERSION
from kurrier.operator.reconciler import ClusterView, Reconciler

# Secrets that never hold credentials or keys a resource could name: skipping
# them keeps Helm release blobs and tokens out of the operator's memory.
IGNORED_SECRET_TYPES = frozenset(
    {
        "helm.sh/release.v1",
        "kubernetes.io/service-account-token",
        "kubernetes.io/dockercfg",
        "kubernetes.io/dockerconfigjson",
        "bootstrap.kubernetes.io/token",
    }
)
SECRETS_INDEX = "secrets"


def _worth_indexing(body: kopf.Body, **_: Any) -> bool:
    return body.get("type") not in IGNORED_SECRET_TYPES


def _values(index: kopf.Index[Any, Any]) -> list[Any]:
    return [value for key in index for value in index[key]]


def build_registry(reconciler: Reconciler) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
        return credentials(settings)

    def index_object(body: kopf.Body, **_: Any) -> dict[Key, ObservedObject]:
        observed = ObservedObject.from_body(body)
        return {(observed.namespace, observed.name): observed}

    def index_secret(body: kopf.Body, **_: Any) -> dict[Key, StoredSecret]:
        key = (body.metadata.namespace or "", body.metadata.name or "")
        return {key: StoredSecret.from_body(body)}

    for plural in PLURALS.values():
        kopf.index(API_GROUP, VERSION, plural, id=plural, registry=registry)(index_object)
    kopf.index("v1", "secrets", id=SECRETS_INDEX, when=_worth_indexing, registry=registry)(
        index_secret
    )

    def view(indices: dict[str, Any]) -> ClusterView:
        relay = [indices[plural] for plural in PLURALS.values()]
        secrets = indices[SECRETS_INDEX]
        return ClusterView(
            objects=lambda: [o for index in relay for o in _values(index)],
            secrets=lambda: {key: value for key in secrets for value in secrets[key]},
        )

    def object_changed(type: str | None, body: kopf.Body, **kwargs: Any) -> None:
        observed = ObservedObject.from_body(body)
        generation = 0 if type == "DELETED" else observed.generation
        reconciler.notice_object(view(kwargs), observed.identity, generation)

    def secret_changed(body: kopf.Body, **kwargs: Any) -> None:
        key = (body.metadata.namespace or "", body.metadata.name or "")
        reconciler.notice_secret(view(kwargs), key)

    for plural in PLURALS.values():
        kopf.on.event(API_GROUP, VERSION, plural, id=f"{plural}-changed", registry=registry)(
            object_changed
        )
    kopf.on.event("v1", "secrets", when=_worth_indexing, registry=registry)(secret_changed)
    return registry
