"""The CRDs on a real kube-apiserver: installed, named, and judging resources like the models.

Every request is a server-side dry run with strict field validation, as
`kubectl apply` sends it: the API server itself (schema and CEL) refuses bad
resources, with a message a person can act on.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from kurrier.core.loader import ResourceError, parse_documents

from tests.operator.objects import GROUP, path_of
from tests.support.kube import Api, Obj
from tests.support.relay import inbound_domain, route, trusting

ROUTE: Obj = yaml.safe_load(route("r", ["example.com", "*.example.org"], 2526))
DOMAIN: Obj = yaml.safe_load(inbound_domain("example.com"))
POLICY: Obj = yaml.safe_load(trusting("10.0.0.0/8"))


_KEY_RSA = {"selector": "rsa1", "secretRef": {"name": "dkim", "key": "rsa.pem"}}
_KEY_ED = {"selector": "ed1", "secretRef": {"name": "dkim", "key": "ed.pem"}}


def _with(base: Obj, path: str, value: Any) -> Obj:
    """A copy of base with the dotted path set (None removes it)."""
    changed = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = changed
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return changed


# (case, document, what the API server says, valid?) -- the models must agree on valid?.
CASES: list[tuple[str, Obj, str, bool]] = [
    ("route", ROUTE, "", True),
    ("domain", DOMAIN, "", True),
    ("policy", POLICY, "", True),
    ("mx route", _with(ROUTE, "spec.destination", {"mx": {}}), "", True),
    (
        "uppercase and trailing-dot domains",
        _with(ROUTE, "spec.match.recipientDomains", ["Example.COM."]),
        "",
        True,
    ),
    (
        "policy with everything",
        _with(
            POLICY,
            "spec",
            {
                "trustedNetworks": ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"],
                "senderRules": [{"identity": "alice", "domains": ["example.com"]}],
                "rateLimit": {"perClientPerMinute": 60},
                "maxMessageSize": 1024,
            },
        ),
        "",
        True,
    ),
    (
        "both smarthost and mx",
        _with(ROUTE, "spec.destination.mx", {}),
        "exactly one of 'smarthost' or 'mx' must be set",
        False,
    ),
    (
        "neither smarthost nor mx",
        _with(ROUTE, "spec.destination", {}),
        "exactly one of 'smarthost' or 'mx' must be set",
        False,
    ),
    (
        "bad recipient domain",
        _with(ROUTE, "spec.match.recipientDomains", ["example.com", "bad domain"]),
        'spec.match.recipientDomains[1]: Invalid value: "bad domain": must be a domain '
        "('example.com'), a wildcard ('*.example.com') or '*'",
        False,
    ),
    (
        "wildcard in the middle",
        _with(ROUTE, "spec.match.recipientDomains", ["a.*.example"]),
        "must be a domain ('example.com'), a wildcard",
        False,
    ),
    (
        "no recipient domains",
        _with(ROUTE, "spec.match.recipientDomains", []),
        "spec.match.recipientDomains: Invalid value: 0: "
        "spec.match.recipientDomains in body should have at least 1 items",
        False,
    ),
    (
        "port out of range",
        _with(ROUTE, "spec.destination.smarthost.port", 70000),
        "spec.destination.smarthost.port in body should be less than or equal to 65535",
        False,
    ),
    (
        "unknown TLS mode",
        _with(ROUTE, "spec.tls.mode", "sometimes"),
        'spec.tls.mode: Unsupported value: "sometimes": supported values: "none", '
        '"opportunistic", "required", "verify"',
        False,
    ),
    (
        "zero connections",
        _with(ROUTE, "spec.maxConnections", 0),
        "spec.maxConnections in body should be greater than or equal to 1",
        False,
    ),
    (
        "site shaping",
        _with(ROUTE, "spec.shaping", {"maxConnections": 5, "messagesPerMinute": 300}),
        "",
        True,
    ),
    (
        "site shaping without a limit",
        _with(ROUTE, "spec.shaping", {}),
        "set maxConnections, messagesPerMinute or both",
        False,
    ),
    (
        "site shaping with no connections",
        _with(ROUTE, "spec.shaping.maxConnections", 0),
        "spec.shaping.maxConnections in body should be greater than or equal to 1",
        False,
    ),
    (
        "priority not a number",
        _with(ROUTE, "spec.priority", "high"),
        'spec.priority: Invalid value: "string": spec.priority in body must be of type integer',
        False,
    ),
    (
        "credentials for MX hosts",
        _with(
            _with(ROUTE, "spec.destination", {"mx": {}}), "spec.auth", {"secretRef": {"name": "c"}}
        ),
        "'auth' needs a 'smarthost' destination",
        False,
    ),
    (
        "credentials in clear text",
        _with(ROUTE, "spec.auth", {"secretRef": {"name": "c"}}),
        "'auth' needs TLS",
        False,
    ),
    (
        "unknown field",
        _with(ROUTE, "spec.surprise", 1),
        'unknown field "spec.surprise"',
        False,
    ),
    ("no spec", _with(ROUTE, "spec", None), "spec: Required value", False),
    (
        "bad domain",
        _with(DOMAIN, "spec.domain", "-bad-.example"),
        'spec.domain: Invalid value: "-bad-.example": '
        "must be a domain name such as 'example.com'",
        False,
    ),
    (
        "bad DKIM selector",
        _with(
            DOMAIN, "spec.dkim", {"selector": "no spaces", "secretRef": {"name": "k", "key": "p"}}
        ),
        "spec.dkim.selector in body should match",
        False,
    ),
    (
        "DKIM with two keys",
        _with(DOMAIN, "spec.dkim", {"keys": [_KEY_RSA, _KEY_ED]}),
        "",
        True,
    ),
    (
        "DKIM with one key and keys",
        _with(DOMAIN, "spec.dkim", {**_KEY_RSA, "keys": [_KEY_ED]}),
        "set either 'selector' and 'secretRef', or 'keys'",
        False,
    ),
    (
        "DKIM selector without its Secret",
        _with(DOMAIN, "spec.dkim", {"selector": "k1"}),
        "'selector' and 'secretRef' go together",
        False,
    ),
    (
        "DKIM keys with one selector twice",
        _with(DOMAIN, "spec.dkim", {"keys": [_KEY_RSA, {**_KEY_ED, "selector": "rsa1"}]}),
        'spec.dkim.keys[1]: Duplicate value: {"selector":"rsa1"}',
        False,
    ),
    (
        "bad network",
        _with(POLICY, "spec.trustedNetworks", ["10.0.0.0/33"]),
        'spec.trustedNetworks[0]: Invalid value: "10.0.0.0/33": must be an IP network in CIDR '
        "notation, e.g. '10.0.0.0/8'",
        False,
    ),
    (
        "tiny message size",
        _with(POLICY, "spec.maxMessageSize", 10),
        "spec.maxMessageSize in body should be greater than or equal to 1024",
        False,
    ),
]


def _dry_run(api: Api, obj: Obj, namespace: str) -> tuple[int, str]:
    response = api.request(
        "POST",
        path_of(obj["kind"], namespace),
        obj,
        {"fieldValidation": "Strict", "dryRun": "All"},
    )
    return response.status, response.message


def _models_accept(obj: Obj) -> bool:
    try:
        parse_documents([obj], "test")
    except ResourceError:
        return False
    return True


def test_the_kinds_are_served_with_short_names_category_and_status(kube: Api) -> None:
    listing = kube.request("GET", GROUP).body
    served = {r["name"]: r for r in listing["resources"]}
    assert {
        name: (r["kind"], r["shortNames"], r["categories"], r["namespaced"])
        for name, r in served.items()
        if "/" not in name
    } == {
        "relaydomains": ("RelayDomain", ["rdom"], ["kurrier"], True),
        "relayroutes": ("RelayRoute", ["rroute"], ["kurrier"], True),
        "relaypolicies": ("RelayPolicy", ["rpol"], ["kurrier"], True),
    }
    assert {"relaydomains/status", "relayroutes/status", "relaypolicies/status"} <= set(served)


@pytest.mark.parametrize(
    ("case", "obj", "message", "valid"), CASES, ids=[case for case, *_ in CASES]
)
def test_the_api_server_judges_like_the_models(
    kube: Api, namespace: str, case: str, obj: Obj, message: str, valid: bool
) -> None:
    status, answer = _dry_run(kube, obj, namespace)
    if valid:
        assert status == 201, answer
    else:
        assert status in (400, 422), f"{case} was accepted"
        assert message in answer, answer
    assert _models_accept(obj) == valid, f"the models judge {case!r} differently"


def test_defaults_are_filled_in_by_the_api_server(kube: Api, namespace: str) -> None:
    minimal = _with(_with(ROUTE, "spec.tls", None), "spec.priority", None)
    minimal = _with(minimal, "spec.destination.smarthost.port", None)
    response = kube.request(
        "POST",
        path_of("RelayRoute", namespace),
        minimal,
        {"fieldValidation": "Strict", "dryRun": "All"},
    )
    assert response.status == 201, response
    [parsed] = parse_documents([minimal], "test")
    spec = response.body["spec"]
    assert spec["tls"] == {"mode": parsed.spec.tls.mode}  # type: ignore[union-attr]
    assert spec["priority"] == parsed.spec.priority  # type: ignore[union-attr]
    assert spec["destination"]["smarthost"]["port"] == 25
    assert spec["maxConnections"] == parsed.spec.maxConnections  # type: ignore[union-attr]
