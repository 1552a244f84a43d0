"""The operator's decisions, without a cluster: objects -> resources, problems -> status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from kurrier.core.routing import Problem, compile_table
from kurrier.operator.cluster_objects import (
    ObservedObject,
    StoredSecret,
    destination,
    referenced_secrets,
    relay_resources,
    secret_resources,
)
from kurrier.operator.dkim_dns import DKIM_PUBLISHED
from kurrier.operator.status import (
    DomainStatus,
    RelayStatus,
    RouteStatus,
    Verdict,
    next_status,
    read_status,
    verdict,
)

from tests.support.relay import inbound_domain, route

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
OK = Verdict(True, "Published", "in the live routing table")
MISSING = Verdict(False, "SecretInvalid", "auth Secret 'creds' not found")
AUTHED_ROUTE = """
apiVersion: kurrier.io/v1alpha1
kind: RelayRoute
metadata: {name: authed}
spec:
  match: {recipientDomains: [example.com]}
  destination: {smarthost: {host: smtp.example.net, port: 587}}
  tls: {mode: required}
  auth: {secretRef: {name: creds}}
"""


def _observed(document: str, namespace: str = "team-a", generation: int = 1) -> ObservedObject:
    body: dict[str, Any] = yaml.safe_load(document)
    body["metadata"].update(
        namespace=namespace, uid=f"uid-{body['metadata']['name']}", generation=generation
    )
    body["metadata"]["resourceVersion"] = "7"
    return ObservedObject.from_body(body)


def _problem(reason: str, message: str) -> Problem:
    return Problem(kind="RelayRoute", namespace="n", name="r", reason=reason, message=message)


def test_verdict_is_ready_without_problems_and_lists_every_problem() -> None:
    assert verdict([]) == OK
    both = verdict([_problem("SecretInvalid", "one"), _problem("Conflict", "two")])
    assert both == Verdict(False, "SecretInvalid", "one; two")


def test_first_status_records_generation_revision_and_transition() -> None:
    change = next_status(None, 1, OK, 5, T0)
    assert change is not None
    [ready] = change.status.conditions
    assert (ready.type, ready.status, ready.reason) == ("Ready", "True", "Published")
    assert ready.observedGeneration == 1
    assert ready.lastTransitionTime == T0.replace(microsecond=0)
    assert (change.status.observedGeneration, change.status.tableRevision) == (1, 5)
    assert (change.events[0].type, change.events[0].reason) == ("Normal", "Published")
    assert change.events[0].message == "generation 1 is in routing table revision 5"


def test_an_unchanged_resource_is_not_rewritten_when_other_resources_bump_the_revision() -> None:
    first = next_status(None, 1, OK, 5, T0)
    assert first is not None
    assert next_status(first.status, 1, OK, 9, T0 + timedelta(minutes=1)) is None


def test_a_new_generation_keeps_the_transition_time_while_ready_stays_true() -> None:
    first = next_status(None, 1, OK, 5, T0)
    assert first is not None
    later = T0 + timedelta(minutes=3)
    second = next_status(first.status, 2, OK, 6, later)
    assert second is not None
    assert second.status.observedGeneration == 2
    assert second.status.tableRevision == 6
    assert second.status.conditions[0].lastTransitionTime == T0.replace(microsecond=0)
    assert second.events[0].message == "generation 2 is in routing table revision 6"


def test_turning_unready_is_a_transition_with_a_warning() -> None:
    first = next_status(None, 1, OK, 5, T0)
    assert first is not None
    later = T0 + timedelta(minutes=3)
    broken = next_status(first.status, 1, MISSING, 6, later)
    assert broken is not None
    [ready] = broken.status.conditions
    assert (ready.status, ready.reason, ready.message) == (
        "False",
        "SecretInvalid",
        "auth Secret 'creds' not found",
    )
    assert ready.lastTransitionTime == later.replace(microsecond=0)
    assert (broken.events[0].type, broken.events[0].reason) == ("Warning", "SecretInvalid")
    assert next_status(broken.status, 1, MISSING, 7, later) is None


def test_route_status_carries_the_destination_and_clears_it() -> None:
    change = next_status(None, 1, OK, 1, T0, RouteStatus, {"destination": "127.0.0.1:2526"})
    assert change is not None
    assert change.status.model_dump(mode="json")["destination"] == "127.0.0.1:2526"
    moved = next_status(change.status, 1, OK, 2, T0, RouteStatus, {"destination": "mx"})
    assert moved is not None
    invalid = next_status(moved.status, 2, MISSING, 3, T0, RouteStatus, {"destination": None})
    assert invalid is not None
    # Written as a JSON merge patch: null removes what an earlier status said.
    assert invalid.status.model_dump(mode="json")["destination"] is None


def test_status_written_by_someone_else_is_ignored_not_fatal() -> None:
    assert read_status(None, RelayStatus) is None
    assert read_status({"conditions": "nonsense"}, RelayStatus) is None
    written = next_status(None, 3, OK, 4, T0)
    assert written is not None
    again = read_status(written.status.model_dump(mode="json"), RelayStatus)
    assert again == written.status


def test_objects_become_the_resources_local_mode_compiles() -> None:
    objects = [
        _observed(route("b-route", ["example.com"], 2526)),
        _observed(route("a-route", ["example.org"], 2527), namespace="team-b"),
    ]
    resources, problems = relay_resources(objects)
    assert problems == []
    assert list(resources) == [
        ("RelayRoute", "team-a", "b-route"),
        ("RelayRoute", "team-b", "a-route"),
    ]
    table, _ = compile_table(resources.values())
    assert [r.name for r in table.routes] == ["team-a/b-route", "team-b/a-route"]
    assert destination(resources[("RelayRoute", "team-a", "b-route")]) == "127.0.0.1:2526"


def test_an_object_the_models_refuse_is_reported_as_invalid_on_that_object() -> None:
    bad = _observed(route("bad", ["example.com"], 2526).replace("port: 2526", "port: 2526}, mx: {"))
    resources, problems = relay_resources([bad])
    assert resources == {}
    assert problems == [
        Problem(
            kind="RelayRoute",
            namespace="team-a",
            name="bad",
            reason="Invalid",
            message="spec.destination: Value error, exactly one of 'smarthost' or 'mx' must be set",
        )
    ]


def test_a_route_shaping_nothing_is_invalid_on_that_object() -> None:
    # The CRD refuses it too; an object stored under an older CRD still reaches the operator.
    empty = _observed(route("empty", ["example.com"], 2526, shaping="{}"))
    resources, problems = relay_resources([empty])
    assert resources == {}
    [problem] = problems
    assert (problem.name, problem.reason, problem.message) == (
        "empty",
        "Invalid",
        "spec.shaping: Value error, set maxConnections, messagesPerMinute or both",
    )


def test_only_referenced_secrets_that_exist_reach_the_compiler() -> None:
    authed = _observed(AUTHED_ROUTE)
    resources, _ = relay_resources([authed, _observed(inbound_domain("example.com"))])
    wanted = referenced_secrets(resources.values())
    assert wanted == {("team-a", "creds")}
    stored = {
        ("team-a", "creds"): StoredSecret("kubernetes.io/basic-auth", {"username": "dQ=="}),
        ("team-a", "unrelated"): StoredSecret("Opaque", {"x": "eA=="}),
    }
    [secret] = secret_resources(stored, wanted)
    assert (secret.metadata.namespace, secret.metadata.name) == ("team-a", "creds")
    assert secret.value("username") == b"u"
    assert secret_resources({}, wanted) == []


def test_a_domain_without_route_is_reported_on_its_relay_domain() -> None:
    resources, _ = relay_resources([_observed(inbound_domain("lonely.test"))])
    _, problems = compile_table(resources.values())
    [problem] = problems
    assert (problem.kind, problem.namespace, problem.name, problem.reason) == (
        "RelayDomain",
        "team-a",
        "lonely-test",
        "NoRoute",
    )


def test_a_domain_the_crd_lets_through_but_idna_refuses_is_invalid_on_that_object() -> None:
    # The CRD's pattern is LDH only; an xn-- label that does not decode passes it.
    resources, problems = relay_resources([_observed(inbound_domain("xn--abc.test"))])
    assert resources == {}
    [problem] = problems
    assert (problem.name, problem.reason) == ("xn--abc-test", "Invalid")
    assert problem.message.startswith(
        "spec.domain: Value error, 'xn--abc.test' is not a valid domain name: "
    )


def test_a_dns_condition_changing_alone_keeps_the_revision_and_notes_only_itself() -> None:
    missing = Verdict(False, "RecordMissing", "no DKIM record in DNS at k1._domainkey.x.test")
    found = Verdict(True, "RecordsPublished", "DNS publishes every DKIM key")
    first = next_status(None, 1, OK, 5, T0, DomainStatus, None, {DKIM_PUBLISHED: missing})
    assert first is not None
    assert [c.type for c in first.status.conditions] == ["Ready", "DkimPublished"]
    assert [(e.type, e.reason) for e in first.events] == [
        ("Normal", "Published"),
        ("Warning", "RecordMissing"),
    ]
    later = T0 + timedelta(minutes=5)
    assert (
        next_status(first.status, 1, OK, 9, later, DomainStatus, None, {"DkimPublished": missing})
        is None
    )
    healed = next_status(
        first.status, 1, OK, 9, later, DomainStatus, None, {"DkimPublished": found}
    )
    assert healed is not None
    assert healed.status.tableRevision == 5  # DNS changed, not the table
    ready, published = healed.status.conditions
    assert ready.lastTransitionTime == T0.replace(microsecond=0)
    assert (published.status, published.lastTransitionTime) == (
        "True",
        later.replace(microsecond=0),
    )
    assert [(e.type, e.reason) for e in healed.events] == [("Normal", "RecordsPublished")]
    # The check turned off: the condition goes, nothing to note.
    dropped = next_status(healed.status, 1, OK, 9, later, DomainStatus)
    assert dropped is not None
    assert ([c.type for c in dropped.status.conditions], dropped.events) == (["Ready"], ())
