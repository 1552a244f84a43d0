"""Namespaces as tenants, in the pure parts: compile_table, routes, senders, conflicts."""

from __future__ import annotations

from typing import Any

from kurrier.core.loader import parse_documents
from kurrier.core.routing import Problem, RoutingTable, compile_table
from kurrier.core.tenancy import check_tenant_sender, inbound_tenant, tenant_of
from kurrier.ingress.relay_policy import check_recipient

PLATFORM = "mail-platform"


def _object(kind: str, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kurrier.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _domain(namespace: str, domain: str, inbound: bool = False) -> dict[str, Any]:
    spec = {"domain": domain, "acceptInbound": inbound}
    return _object("RelayDomain", namespace, domain.replace(".", "-"), spec)


def _route(namespace: str, name: str, domains: list[str], priority: int = 0) -> dict[str, Any]:
    spec = {
        "priority": priority,
        "match": {"recipientDomains": domains},
        "destination": {"smarthost": {"host": f"{name}.{namespace}.test"}},
    }
    return _object("RelayRoute", namespace, name, spec)


def _policy(namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    return _object("RelayPolicy", namespace, name, spec)


def _two_teams(*extra: dict[str, Any]) -> tuple[RoutingTable, list[Problem]]:
    documents = [
        _policy(
            PLATFORM,
            "platform",
            trustedNetworks=["10.0.0.0/8"],
            maxMessageSize=1_000_000,
            senderRules=[{"identity": "namespace:team-b", "domains": ["shared.test"]}],
        ),
        _route(PLATFORM, "internet", ["*"]),
        _domain("team-a", "a.test", inbound=True),
        _route("team-a", "a-relay", ["*"], priority=10),
        _policy("team-a", "a", trustedNetworks=["10.1.0.0/16"], maxMessageSize=2048),
        _domain("team-b", "b.test"),
        _route("team-b", "b-relay", ["*"], priority=10),
        *extra,
    ]
    return compile_table(parse_documents(documents, "t"), platform_namespace=PLATFORM)


def _sa(namespace: str) -> str:
    return f"system:serviceaccount:{namespace}:mailer"


def test_each_tenant_is_routed_by_its_own_routes_and_the_platforms() -> None:
    table, problems = _two_teams()
    assert problems == []

    def route(tenant: str) -> str | None:
        found = table.route_for("example.com", "", tenant)
        return found.name if found else None

    assert route("team-a") == "team-a/a-relay"
    assert route("team-b") == "team-b/b-relay"
    assert route(PLATFORM) == f"{PLATFORM}/internet"
    assert route("team-c") == f"{PLATFORM}/internet", "a namespace without routes: the platform's"


def test_the_tenant_of_a_login_a_network_and_anonymous_mail() -> None:
    table, _ = _two_teams()
    assert tenant_of(table, _sa("team-b"), "203.0.113.9") == "team-b"
    assert tenant_of(table, "", "10.1.2.3") == "team-a", "inside the platform's 10.0.0.0/8"
    assert tenant_of(table, "", "10.2.0.1") == PLATFORM
    assert tenant_of(table, "", "203.0.113.9") is None
    assert inbound_tenant(table, "a.test") == "team-a"
    assert inbound_tenant(table, "b.test") == PLATFORM, "b.test does not accept inbound mail"


def test_a_tenant_sends_as_its_domains_and_as_the_platform_grants() -> None:
    table, _ = _two_teams()
    assert check_tenant_sender(table, "team-a", _sa("team-a"), "x@a.test") is None
    assert check_tenant_sender(table, "team-a", _sa("team-a"), "") is None, "bounces"
    refused = check_tenant_sender(table, "team-a", _sa("team-a"), "x@b.test")
    assert refused is not None and refused.startswith("553 5.7.1")
    assert check_tenant_sender(table, "team-b", "", "x@shared.test") is None, "granted"
    refused = check_tenant_sender(table, "team-a", "", "x@shared.test")
    assert refused is not None and refused.startswith("553 5.7.1")


def test_a_tenants_own_sender_rules_bind_only_its_identities() -> None:
    rule = {"identity": "*", "domains": ["news.a.test"]}
    table, _ = _two_teams(
        _domain("team-a", "news.a.test"), _policy("team-a", "rules", senderRules=[rule])
    )
    refused = check_tenant_sender(table, "team-a", _sa("team-a"), "x@a.test")
    assert refused is not None and refused.startswith("553 5.7.1")
    assert check_tenant_sender(table, "team-a", _sa("team-a"), "x@news.a.test") is None
    assert check_tenant_sender(table, "team-b", _sa("team-b"), "x@b.test") is None


def test_limits_are_the_platforms_alone() -> None:
    table, _ = _two_teams()
    assert table.policy.max_message_size == 1_000_000, "team-a's 2048 does not bind others"


def test_anonymous_mail_for_a_tenants_domain_takes_its_routes_only() -> None:
    table, _ = _two_teams(_route("team-b", "b-a-test", ["a.test"], priority=100))
    assert table.route_for("a.test", "", inbound_tenant(table, "a.test")).name == (  # type: ignore[union-attr]
        "team-a/a-relay"
    )
    assert check_recipient(table, "203.0.113.9", False, "x@a.test", "", tenant=None) is None


def test_claims_on_anothers_domain_or_network_are_conflicts() -> None:
    table, problems = _two_teams(
        _domain("team-b", "a.test", inbound=True),
        _policy("team-b", "grab", trustedNetworks=["10.1.2.0/24", "0.0.0.0/0"]),
    )
    found = {(p.namespace, p.name, p.reason, p.message) for p in problems}
    assert (
        "team-b",
        "a-test",
        "Conflict",
        "domain 'a.test' is declared by more than one RelayDomain (team-a/a-test keeps it)",
    ) in found
    assert (
        "team-b",
        "grab",
        "Conflict",
        "trusted network 10.1.2.0/24 overlaps 10.1.0.0/16, claimed by team-a/a; ignored",
    ) in found
    # A tenant cannot open the relay to addresses the platform does not trust.
    assert (
        "team-b",
        "grab",
        "Conflict",
        "trusted network 0.0.0.0/0 is not inside a trusted network of the platform's "
        "RelayPolicies; ignored",
    ) in found
    assert table.domain("a.test").namespace == "team-a"  # type: ignore[union-attr]
    assert tenant_of(table, "", "10.1.2.3") == "team-a"
    assert not table.is_trusted("203.0.113.9")


def test_a_tenant_never_takes_a_platform_domain_even_when_older() -> None:
    older = _domain("team-a", "relay.test")
    older["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"
    newer = _domain(PLATFORM, "relay.test")
    newer["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    table, problems = _two_teams(older, newer)
    assert table.domain("relay.test").namespace == PLATFORM  # type: ignore[union-attr]
    assert [(p.namespace, p.reason) for p in problems] == [("team-a", "Conflict")]


def test_without_a_platform_namespace_every_resource_governs_all_mail() -> None:
    documents = [_route("team-a", "a-relay", ["*"], priority=10), _route("team-b", "b", ["*"])]
    table, _ = compile_table(parse_documents(documents, "t"))
    assert table.route_for("example.com", "", "").name == "team-a/a-relay"  # type: ignore[union-attr]
    assert tenant_of(table, _sa("team-b"), "203.0.113.9") == ""


def test_a_user_belongs_to_the_namespace_of_the_policy_naming_it() -> None:
    users = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "smtp-users", "namespace": "team-b"},
        "stringData": {"billing": "$2b$10$" + "x" * 53},
    }
    auth = {"usersSecretRef": {"name": "smtp-users"}}
    documents = [_policy("team-b", "logins", auth=auth), users]
    table, problems = compile_table(parse_documents(documents, "t"), platform_namespace=PLATFORM)
    assert problems == []
    assert tenant_of(table, "billing", "203.0.113.9") == "team-b"
    assert tenant_of(table, "someone-else", "203.0.113.9") == PLATFORM


def test_quotas_are_the_platforms_strictest_and_star_covers_the_others() -> None:
    table, _ = _two_teams(
        _policy(
            PLATFORM,
            "quotas",
            namespaceQuotas=[
                {"namespace": "team-a", "messagesPerMinute": 10, "recipientsPerDay": 500},
                {"namespace": "team-a", "messagesPerMinute": 20, "messagesPerDay": 100},
                {"namespace": "*", "recipientsPerMinute": 5},
            ],
        ),
        # A tenant cannot give itself a quota, nor another tenant one.
        _policy("team-b", "mine", namespaceQuotas=[{"namespace": "team-b", "messagesPerDay": 1}]),
    )
    team_a = table.policy.quota_for("team-a")
    assert team_a is not None
    assert (team_a.messages_per_minute, team_a.messages_per_day) == (10, 100)
    assert (team_a.recipients_per_minute, team_a.recipients_per_day) == (None, 500)
    team_b = table.policy.quota_for("team-b")
    assert team_b is not None and team_b.messages_per_day is None
    assert team_b.recipients_per_minute == 5
    without_tenancy, _ = compile_table(
        parse_documents([_policy("x", "p", namespaceQuotas=[{"namespace": "*"}])], "t")
    )
    assert without_tenancy.policy.quota_for("") is None, "quotas are for tenants"
