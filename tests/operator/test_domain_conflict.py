"""Two RelayDomains declaring one domain, as real objects on the API server.

The routing table keeps the older one, so creating a RelayDomain never takes
a domain from one already in use (objects created within the same second:
the first by namespace and name, the same on every replica and restart). The
newer one is marked Ready=False with reason Conflict, with a Warning Event,
and is left out. Deleting the one in use hands the domain to the other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import yaml

from tests.operator.objects import apply, delete, events_of, wait_for_status
from tests.operator.operator_process import OperatorProcess
from tests.operator.published_table import wait_for_table
from tests.support.kube import Api
from tests.support.nats import NatsServer
from tests.support.processes import wait_until
from tests.support.relay import route

SHARED = "shared.test"


def _conflict(namespace: str, holder: str) -> str:
    declared = f"domain '{SHARED}' is declared by more than one RelayDomain"
    return f"{declared} ({namespace}/{holder} keeps it)"


def _domain(name: str, accept_inbound: bool) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": name},
            "spec": {"domain": SHARED, "acceptInbound": accept_inbound},
        }
    )


def _created(status_object: dict[str, object]) -> datetime:
    metadata = status_object["metadata"]
    assert isinstance(metadata, dict)
    return datetime.fromisoformat(metadata["creationTimestamp"])


def test_two_relay_domains_for_one_domain_conflict(
    kube: Api, operator_kubeconfig: Path, namespace: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    with OperatorProcess(tmp_path, operator_kubeconfig, nats_server.url, [namespace]):
        apply(kube, namespace, route("everything", ["*"], 2526))
        # Declared first, and published alone: inbound mail accepted.
        apply(kube, namespace, _domain("b-inbound", accept_inbound=True))
        first = wait_for_status(kube, "RelayDomain", namespace, "b-inbound", ready=True)
        # Creation times have whole seconds: the newcomer must be visibly newer.
        wait_until(
            lambda: (datetime.now(UTC) - _created(first)).total_seconds() >= 1.5,
            10,
            "a creation time one second later",
        )
        # A newer declaration, though it sorts first by name, does not take it.
        apply(kube, namespace, _domain("a-outbound", accept_inbound=False))
        loser = wait_for_status(kube, "RelayDomain", namespace, "a-outbound", ready=False)
        [condition] = loser["status"]["conditions"]
        assert (condition["reason"], condition["message"]) == (
            "Conflict",
            _conflict(namespace, "b-inbound"),
        )
        wait_for_status(kube, "RelayDomain", namespace, "b-inbound", ready=True)
        table = wait_for_table(
            nats_server.url,
            lambda t: t["revision"] >= loser["status"]["tableRevision"],
            "the table with the conflict",
        )
        assert [(d["domain"], d["accept_inbound"]) for d in table["domains"]] == [(SHARED, True)]
        warnings = [e for e in events_of(kube, namespace, "a-outbound") if e["type"] == "Warning"]
        assert [(e["reason"], e["message"]) for e in warnings] == [
            ("Conflict", _conflict(namespace, "b-inbound"))
        ]

        # The one in use goes: the other is published, and Ready again.
        delete(kube, "RelayDomain", namespace, "b-inbound")
        wait_for_status(kube, "RelayDomain", namespace, "a-outbound", ready=True)
        table = wait_for_table(
            nats_server.url,
            lambda t: [d["accept_inbound"] for d in t["domains"]] == [False],
            "the remaining declaration in the table",
        )
        assert [d["domain"] for d in table["domains"]] == [SHARED]
