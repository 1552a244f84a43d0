"""The pure routing table: compile, match by priority and wildcard, serialise."""

from __future__ import annotations

import json
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


def _policy(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kurrier.io/v1alpha1",
        "kind": "RelayPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def _users(name: str, **hashes: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": hashes}


# Shapes of bcrypt hashes: compile_table checks the scheme, not the password.
HASH_A = "$2b$12$" + "a" * 53
HASH_B = "$2b$12$" + "b" * 53


def test_any_policy_requiring_tls_for_auth_requires_it_for_everyone() -> None:
    for order in (("a", "b"), ("b", "a")):
        table = _compile(
            _policy(order[0], requireTLSForAuth=False),
            _policy(order[1], requireTLSForAuth=True),
        )
        assert table.policy.require_tls_for_auth
    assert not _compile(_policy("a", requireTLSForAuth=False)).policy.require_tls_for_auth


def test_every_limit_takes_the_strictest_policy() -> None:
    table = _compile(
        _policy(
            "a",
            maxMessageSize=10_000,
            maxRecipients=5,
            maxConnectionsPerClient=50,
            rateLimit={"perClientPerMinute": 600, "perIdentityPerMinute": 10},
        ),
        _policy(
            "b",
            maxMessageSize=50_000,
            maxRecipients=50,
            maxConnectionsPerClient=3,
            rateLimit={"perClientPerMinute": 60},
        ),
    )
    policy = table.policy
    assert (policy.max_message_size, policy.max_recipients) == (10_000, 5)
    assert policy.max_connections_per_client == 3
    assert (policy.rate_per_minute, policy.identity_rate_per_minute) == (60, 10)


def test_trusted_networks_escape_per_client_limits_unless_a_policy_says_otherwise() -> None:
    trusting = _policy("a", trustedNetworks=["10.0.0.0/8"])
    table = _compile(trusting)
    assert not table.limits_client("10.1.2.3")
    assert table.limits_client("192.0.2.1")
    strict = _compile(trusting, _policy("b", limitTrustedNetworks=True))
    assert strict.limits_client("10.1.2.3") and strict.limits_client("192.0.2.1")


def test_bounces_for_unauthenticated_mail_go_as_far_as_the_narrowest_policy_says() -> None:
    assert _compile().policy.bounce_unauthenticated == "relayDomains"
    assert _compile(_policy("a")).policy.bounce_unauthenticated == "relayDomains"
    everyone = _policy("a", bounceUnauthenticated="all")
    assert _compile(everyone).policy.bounce_unauthenticated == "all"
    # A policy that does not say takes the default, which is narrower than "all".
    assert _compile(everyone, _policy("b")).policy.bounce_unauthenticated == "relayDomains"
    for order in (("a", "b"), ("b", "a")):
        table = _compile(
            _policy(order[0], bounceUnauthenticated="none"),
            _policy(order[1], bounceUnauthenticated="all"),
        )
        assert table.policy.bounce_unauthenticated == "none"


def test_the_delay_warning_goes_at_the_earliest_age_a_policy_sets() -> None:
    assert _compile(_policy("a")).policy.delay_warning_time is None  # the queue's setting
    hours = _policy("a", delayWarningTime="4h")
    assert _compile(hours).policy.delay_warning_time == 4 * 3600
    minutes = _policy("b", delayWarningTime="1h30m")
    assert _compile(hours, minutes).policy.delay_warning_time == 90 * 60
    never = _policy("c", delayWarningTime="0s")
    assert _compile(hours, never).policy.delay_warning_time == 4 * 3600
    assert _compile(never).policy.delay_warning_time == 0


def test_the_first_audience_wins_and_a_second_one_is_reported() -> None:
    table, problems = compile_table(
        parse_documents(
            [
                _policy("b", auth={"serviceAccountAudience": "other"}),
                _policy("a", auth={"serviceAccountAudience": "kurrier"}),
                _policy("c", auth={"serviceAccountAudience": "kurrier"}),
            ],
            "t",
        )
    )
    assert table.policy.service_account_audience == "kurrier"
    assert [(p.name, p.reason) for p in problems] == [("b", "Conflict")]


def test_a_user_defined_twice_keeps_the_first_hash_and_is_reported() -> None:
    table, problems = compile_table(
        parse_documents(
            [
                _users("first", alice=HASH_A, bob=HASH_A),
                _users("second", alice=HASH_B, bob=HASH_A, carol=HASH_B),
                _policy("b", auth={"usersSecretRef": {"name": "second"}}),
                _policy("a", auth={"usersSecretRef": {"name": "first"}}),
            ],
            "t",
        )
    )
    assert table.policy.users == {"alice": HASH_A, "bob": HASH_A, "carol": HASH_B}
    assert [(p.name, p.reason) for p in problems] == [("b", "Conflict")]
    assert "'alice'" in problems[0].message


def _created(document: dict[str, Any], when: str) -> dict[str, Any]:
    return {**document, "metadata": {**document["metadata"], "creationTimestamp": when}}


def test_the_older_resource_keeps_what_two_claim() -> None:
    domain = {"apiVersion": "kurrier.io/v1alpha1", "kind": "RelayDomain"}
    table, problems = compile_table(
        parse_documents(
            [
                _created(
                    {**domain, "metadata": {"name": "a-new"}, "spec": {"domain": "x.test"}},
                    "2026-12-05T10:00:01Z",
                ),
                _created(
                    {
                        **domain,
                        "metadata": {"name": "b-old"},
                        "spec": {"domain": "x.test", "acceptInbound": True},
                    },
                    "2026-12-05T10:00:00Z",
                ),
                _created(
                    _policy("a-new", auth={"serviceAccountAudience": "new"}),
                    "2026-12-05T10:00:01Z",
                ),
                _created(
                    _policy("b-old", auth={"serviceAccountAudience": "old"}),
                    "2026-12-05T10:00:00Z",
                ),
            ],
            "t",
        )
    )
    assert [(d.domain, d.accept_inbound) for d in table.domains] == [("x.test", True)]
    assert table.policy.service_account_audience == "old"
    assert sorted((p.kind, p.name, p.reason) for p in problems) == [
        ("RelayDomain", "a-new", "Conflict"),
        ("RelayDomain", "b-old", "NoRoute"),
        ("RelayPolicy", "a-new", "Conflict"),
    ]


def test_a_table_with_one_key_per_domain_from_an_older_operator_is_read() -> None:
    # What the operator published before domains had several keys: pods read it
    # during an upgrade instead of waiting for a table they understand.
    older = {
        "revision": 3,
        "domains": [
            {
                "domain": "a.test",
                "accept_inbound": False,
                "dkim_selector": "k1",
                "dkim_private_key": "PEM",
            },
            {
                "domain": "b.test",
                "accept_inbound": True,
                "dkim_selector": None,
                "dkim_private_key": None,
            },
        ],
    }
    table = RoutingTable.model_validate_json(json.dumps(older))
    signing, inbound = table.domains
    assert [(k.selector, k.private_key) for k in signing.dkim_keys] == [("k1", "PEM")]
    assert inbound.dkim_keys == ()


def test_problems_and_the_tables_repr_name_secrets_never_their_values() -> None:
    """Problems become CR status and log lines; a table may be logged whole."""
    marks = {
        "half": "MARK-HALF",
        "password": "MARK-PASSWORD",
        "pem": "MARKPEMBODY",
        "plaintext": "MARK-PLAINTEXT",
    }
    documents = [
        _route("r", ["*"], auth={"secretRef": {"name": "half"}}),
        _users("half", password=marks["half"]),
        _route("s", ["s.test"], auth={"secretRef": {"name": "creds"}}),
        _users("creds", username="u", password=marks["password"]),
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": "signed"},
            "spec": {
                "domain": "signed.test",
                "dkim": {"selector": "k1", "secretRef": {"name": "dkim", "key": "private.pem"}},
            },
        },
        _users(
            "dkim",
            **{
                "private.pem": "-----BEGIN PRIVATE KEY-----\n"
                f"{marks['pem']}\n-----END PRIVATE KEY-----\n"
            },
        ),
        _policy("p", auth={"usersSecretRef": {"name": "users"}}),
        _users("users", alice=marks["plaintext"], bob="$2b$04$" + "h" * 53),
    ]
    table, problems = compile_table(parse_documents(documents, "t"))
    assert {p.kind for p in problems} == {"RelayRoute", "RelayDomain", "RelayPolicy"}
    shown = "\n".join(p.message for p in problems) + repr(table)
    assert table.policy.users and "$2b$04$" not in repr(table)
    assert any(route.password == marks["password"] for route in table.routes)
    for mark in marks.values():
        assert mark not in shown


def test_a_stored_domain_idna_2008_refuses_is_taken_as_written() -> None:
    # What an older version's IDNA 2003 let into the queue must still route.
    assert domain_of("u@Under_Score.test") == "under_score.test"
    table, _ = compile_table(parse_documents([_route("all", ["*"])], "t"))
    route = table.route_for(domain_of("u@Under_Score.test"), "")
    assert route is not None and route.name == "all"
