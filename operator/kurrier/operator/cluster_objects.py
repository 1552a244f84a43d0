"""The API server's objects as the operator holds them, and their translation to core resources.

Pure: plain data in, models and problems out. The watches (watches.py) fill
these from kopf's indices; the reconciler compiles what they translate to.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kurrier.core.dkim_keys import dkim_txt_record
from kurrier.core.loader import ResourceError, parse_documents
from kurrier.core.resources import (
    API_VERSION,
    RelayDomain,
    RelayPolicy,
    RelayRoute,
    Secret,
)
from kurrier.core.routing import Problem, dkim_keys
from kurrier.operator.status import DkimRecord

Key = tuple[str, str]  # (namespace, name)
Identity = tuple[str, str, str]  # (kind, namespace, name)
RelayResource = RelayDomain | RelayRoute | RelayPolicy

PLURALS = {
    "RelayDomain": "relaydomains",
    "RelayRoute": "relayroutes",
    "RelayPolicy": "relaypolicies",
}
INVALID = "Invalid"


@dataclass(frozen=True)
class ObservedObject:
    """One RelayDomain, RelayRoute or RelayPolicy as the watch last saw it."""

    kind: str
    namespace: str
    name: str
    uid: str
    generation: int
    resource_version: str
    created: str
    spec: Any
    status: Any

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ObservedObject:
        metadata = body["metadata"]
        return cls(
            kind=body["kind"],
            namespace=metadata["namespace"],
            name=metadata["name"],
            uid=metadata["uid"],
            generation=int(metadata.get("generation") or 0),
            resource_version=metadata.get("resourceVersion", ""),
            created=metadata.get("creationTimestamp", ""),
            # Copies: kopf may replace the body under us while a reconcile reads it.
            spec=copy.deepcopy(body.get("spec")),
            status=copy.deepcopy(body.get("status")),
        )

    @property
    def identity(self) -> Identity:
        return (self.kind, self.namespace, self.name)

    @property
    def plural(self) -> str:
        return PLURALS[self.kind]

    def document(self) -> dict[str, Any]:
        """The object as a resource document, the shape `kurrier up` reads from a file."""
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "generation": self.generation,
                "creationTimestamp": self.created or None,
            },
            "spec": self.spec,
        }


@dataclass(frozen=True)
class StoredSecret:
    """The parts of a Secret the compiler may need; never logged."""

    type: str
    data: Mapping[str, str]

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> StoredSecret:
        return cls(type=body.get("type") or "Opaque", data=dict(body.get("data") or {}))


def _invalid_message(error: ResourceError) -> str:
    # The loader says "SOURCE: document 1 (Kind 'name'): field: problem"; the
    # status belongs to that very object, so only "field: problem" is news.
    return "; ".join(problem.split(": ", 2)[-1] for problem in error.problems)


def relay_resources(
    objects: Iterable[ObservedObject],
) -> tuple[dict[Identity, RelayResource], list[Problem]]:
    """Validate each object with the same models `kurrier up` uses.

    The CRD schema rejects almost everything the models do, but not all (an
    object stored before a CRD upgrade, a check only Python can make): such an
    object is left out of the table and reported as Invalid.
    """
    resources: dict[Identity, RelayResource] = {}
    problems: list[Problem] = []
    for observed in sorted(objects, key=lambda o: o.identity):
        try:
            [resource] = parse_documents([observed.document()], observed.kind)
        except ResourceError as error:
            problems.append(
                Problem(
                    kind=observed.kind,
                    namespace=observed.namespace,
                    name=observed.name,
                    reason=INVALID,
                    message=_invalid_message(error),
                )
            )
            continue
        assert isinstance(resource, RelayDomain | RelayRoute | RelayPolicy)
        resources[observed.identity] = resource
    return resources, problems


def referenced_secrets(resources: Iterable[RelayResource]) -> set[Key]:
    """The Secrets the resources name, as (namespace, name)."""
    wanted: set[Key] = set()
    for resource in resources:
        namespace = resource.metadata.namespace or "default"
        if isinstance(resource, RelayDomain) and resource.spec.dkim:
            wanted.update((namespace, k.secretRef.name) for k in resource.spec.dkim.signing_keys)
        if isinstance(resource, RelayRoute) and resource.spec.auth:
            wanted.add((namespace, resource.spec.auth.secretRef.name))
        auth = resource.spec.auth if isinstance(resource, RelayPolicy) else None
        if auth is not None and auth.usersSecretRef is not None:
            wanted.add((namespace, auth.usersSecretRef.name))
    return wanted


def secret_resources(secrets: Mapping[Key, StoredSecret], wanted: Iterable[Key]) -> list[Secret]:
    """The wanted Secrets that exist, as the resources compile_table reads."""
    found = []
    for namespace, name in sorted(wanted):
        stored = secrets.get((namespace, name))
        if stored is None:
            continue
        found.append(
            Secret.model_validate(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": namespace},
                    "type": stored.type,
                    "data": dict(stored.data),
                }
            )
        )
    return found


def destination(resource: RelayResource | None) -> str | None:
    """Where a route sends mail, as `kubectl get relayroutes` shows it."""
    if not isinstance(resource, RelayRoute):
        return None
    smarthost = resource.spec.destination.smarthost
    return f"{smarthost.host}:{smarthost.port}" if smarthost else "mx"


def dkim_records(domain: RelayDomain, secrets: Iterable[Secret]) -> list[DkimRecord]:
    """The TXT records that publish the domain's usable DKIM keys, in signing order."""
    by_key = {(s.metadata.namespace or "default", s.metadata.name): s for s in secrets}
    keys, _ = dkim_keys(domain, by_key)  # the compiler reports the unusable ones
    records = []
    for key in keys:
        name, value = dkim_txt_record(key.private_key, key.selector, domain.spec.domain)
        records.append(DkimRecord(selector=key.selector, name=name, value=value))
    return records


def status_details(
    kind: str, resource: RelayResource | None, secrets: Iterable[Secret]
) -> dict[str, object]:
    """The fields of a kind's own status: a route's destination, a domain's DKIM records.

    resource is None when the object is invalid: then the fields are cleared.
    """
    if kind == "RelayRoute":
        return {"destination": destination(resource)}
    if kind == "RelayDomain":
        records = dkim_records(resource, secrets) if isinstance(resource, RelayDomain) else []
        return {"dkimRecords": records}
    return {}
