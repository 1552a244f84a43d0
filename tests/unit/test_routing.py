"""The pure routing table: compile, match by priority and wildcard, serialise."""

from __future__ import annotations

from typing import Any

from kurrier.core.loader import parse_documents
from kurrier.core.routing import RoutingTable, compile_table, domain_matches, domain_of


def _route(name: str, domains: list[str], priority: int = 0, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kurrier.io/v1alpha1",
        "kind": "RelayRoute",
        "metadata": {"name": name},
        "spec": {
            "priority": priority,
            "match": {"recipientDomains": domains, **spec.pop("match", {})},
            "destination": spec.pop("destination", {"smarthost": {"host": name, "port": 25}}),
            **spec,
        },
    }


def _compile(*documents: dict[str, Any]) -> RoutingTable:
    table, _ = compile_table(parse_documents(documents, "t"))
    return table


def test_domain_patterns() -> None:
    assert domain_matches("*", "anything.test")
    assert domain_matches("*.example.org", "a.b.example.org")
    assert not domain_matches("*.example.org", "example.org")
    assert not domain_matches("*.example.org", "badexample.org")
    assert domain_matches("example.com", "example.com")
    assert not domain_matches("example.com", "sub.example.com")


def test_domain_of_addresses() -> None:
    assert domain_of("a@Example.COM") == "example.com"
    assert domain_of('"odd@local"@example.com') == "example.com"
    assert domain_of("") == ""
    assert domain_of("postmaster") == ""


def test_priority_then_name_decides() -> None:
    table = _compile(
        _route("catch-all", ["*"], priority=1),
        _route("b-specific", ["example.com"], priority=100),
        _route("a-specific", ["example.com"], priority=100),
        _route("wild", ["*.example.com"], priority=50),
    )
    assert [r.name for r in table.routes] == ["a-specific", "b-specific", "wild", "catch-all"]
    assert table.route_for("example.com").name == "a-specific"  # type: ignore[union-attr]
    assert table.route_for("x.example.com").name == "wild"  # type: ignore[union-attr]
    assert table.route_for("other.test").name == "catch-all"  # type: ignore[union-attr]


def test_sender_domains_restrict_a_route() -> None:
    table = _compile(
        _route("from-billing", ["*"], priority=10, match={"senderDomains": ["billing.test"]}),
        _route("default", ["example.com"]),
    )
    assert table.route_for("example.com", "billing.test").name == "from-billing"  # type: ignore[union-attr]
    assert table.route_for("example.com", "other.test").name == "default"  # type: ignore[union-attr]
    assert table.route_for("nowhere.test", "other.test") is None


def test_missing_auth_secret_marks_route_unusable_and_reports() -> None:
    table, problems = compile_table(
        parse_documents([_route("authed", ["example.com"], auth={"secretRef": {"name": "x"}})], "t")
    )
    [route] = table.routes
    assert route.problem == "auth Secret 'x' not found"
    assert [(p.kind, p.name, p.reason) for p in problems] == [
        ("RelayRoute", "authed", "SecretInvalid")
    ]


def test_auth_secret_and_policies_merge() -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "creds"},
        "stringData": {"username": "u", "password": "p"},
    }
    policies = [
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayPolicy",
            "metadata": {"name": name},
            "spec": {"trustedNetworks": networks, "maxRecipients": limit},
        }
        for name, networks, limit in (("a", ["10.0.0.0/8"], 50), ("b", ["192.0.2.0/24"], 20))
    ]
    table, problems = compile_table(
        parse_documents(
            [secret, _route("r", ["*"], auth={"secretRef": {"name": "creds"}}), *policies], "t"
        )
    )
    assert problems == []
    assert (table.routes[0].username, table.routes[0].password) == ("u", "p")
    assert table.policy.max_recipients == 20
    assert table.is_trusted("10.1.2.3") and table.is_trusted("192.0.2.9")
    assert not table.is_trusted("127.0.0.1")
    assert not table.is_trusted("not-an-ip")


def test_accepted_domain_without_route_is_reported() -> None:
    domain = {
        "apiVersion": "kurrier.io/v1alpha1",
        "kind": "RelayDomain",
        "metadata": {"name": "d"},
        "spec": {"domain": "lonely.test", "acceptInbound": True},
    }
    table, problems = compile_table(parse_documents([domain], "t"))
    assert table.accepts_inbound("lonely.test")
    assert not table.accepts_inbound("other.test")
    assert [p.reason for p in problems] == ["NoRoute"]


def test_table_round_trips_through_json() -> None:
    table = _compile(_route("r", ["example.com"]))
    again = RoutingTable.model_validate_json(table.model_dump_json())
    assert again.route_for("example.com") == table.route_for("example.com")
    assert again.model_dump() == table.model_dump()
