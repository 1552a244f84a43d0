"""Resource models and the YAML loader: valid documents load, bad ones name document and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from kurrier.core.loader import ResourceError, load_resources, parse_documents
from kurrier.core.resources import RelayDomain, RelayRoute, Secret

ROUTE = {
    "apiVersion": "kurrier.io/v1alpha1",
    "kind": "RelayRoute",
    "metadata": {"name": "r1"},
    "spec": {
        "match": {"recipientDomains": ["Example.COM", "*.example.org", "*"]},
        "destination": {"smarthost": {"host": "127.0.0.1", "port": 2526}},
    },
}


def _with_spec(**spec: object) -> dict[str, object]:
    return {**ROUTE, "spec": {**ROUTE["spec"], **spec}}  # type: ignore[dict-item]


def test_example_file_loads() -> None:
    resources = load_resources(Path(__file__).parents[2] / "examples" / "local.yaml")
    assert [r.kind for r in resources] == ["RelayDomain", "RelayRoute", "RelayPolicy"]


def test_route_defaults_and_normalised_domains() -> None:
    [route] = parse_documents([ROUTE], "t")
    assert isinstance(route, RelayRoute)
    assert route.spec.match.recipientDomains == ["example.com", "*.example.org", "*"]
    assert route.spec.tls.mode == "opportunistic"
    assert route.spec.maxConnections == 10
    assert route.spec.priority == 0


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"destination": {"smarthost": {"host": "h", "port": 70000}}},
            "document 1 (RelayRoute 'r1'): spec.destination.smarthost.port: "
            "Input should be less than or equal to 65535",
        ),
        (
            {"destination": {"smarthost": {"host": "h"}, "mx": {}}},
            "spec.destination: Value error, exactly one of 'smarthost' or 'mx' must be set",
        ),
        ({"destination": {}}, "exactly one of 'smarthost' or 'mx' must be set"),
        ({"tls": {"mode": "sometimes"}}, "spec.tls.mode: Input should be 'none', 'opportunistic'"),
        ({"match": {"recipientDomains": []}}, "spec.match.recipientDomains: List should have at"),
        ({"match": {"recipientDomains": ["bad domain"]}}, "'bad domain' is not a domain pattern"),
        ({"surprise": 1}, "spec.surprise: Extra inputs are not permitted"),
        ({"maxConnections": 0}, "spec.maxConnections: Input should be greater than or equal to 1"),
        (
            {"shaping": {"maxConnections": 0}},
            "spec.shaping.maxConnections: Input should be greater than or equal to 1",
        ),
        (
            {"shaping": {}},
            "spec.shaping: Value error, set maxConnections, messagesPerMinute or both",
        ),
    ],
)
def test_bad_route_errors_name_document_and_field(spec: dict[str, object], expected: str) -> None:
    with pytest.raises(ResourceError) as error:
        parse_documents([_with_spec(**spec)], "routes.yaml")
    assert expected in str(error.value)
    assert str(error.value).startswith("routes.yaml: document 1 (RelayRoute 'r1'): ")


def test_every_bad_document_is_reported_once() -> None:
    bad_policy = {
        "apiVersion": "kurrier.io/v1alpha1",
        "kind": "RelayPolicy",
        "metadata": {"name": "p"},
        "spec": {"trustedNetworks": ["10.0.0.0/33"]},
    }
    with pytest.raises(ResourceError) as error:
        parse_documents([ROUTE, {"kind": "Nope"}, "text", bad_policy], "f.yaml")
    assert error.value.problems == [
        "f.yaml: document 2 (Nope): kind: 'Nope' is not one of RelayDomain, RelayRoute, "
        "RelayPolicy, Secret",
        "f.yaml: document 3 (?): expected a mapping, got str",
        "f.yaml: document 4 (RelayPolicy 'p'): spec.trustedNetworks: Value error, "
        "'10.0.0.0/33' is not an IP network in CIDR notation",
    ]


def test_wrong_api_version_and_bad_name() -> None:
    domain = {
        "apiVersion": "kurrier.io/v2",
        "kind": "RelayDomain",
        "metadata": {"name": "Not_Valid"},
        "spec": {"domain": "example.com"},
    }
    with pytest.raises(ResourceError) as error:
        parse_documents([domain], "d.yaml")
    text = str(error.value)
    assert "apiVersion: Input should be 'kurrier.io/v1alpha1'" in text
    assert "metadata.name: Value error, 'Not_Valid' is not a valid Kubernetes object name" in text


def test_idn_domain_becomes_a_labels() -> None:
    domain = {
        "apiVersion": "kurrier.io/v1alpha1",
        "kind": "RelayDomain",
        "metadata": {"name": "muenchen"},
        "spec": {"domain": "München.DE", "acceptInbound": True},
    }
    [loaded] = parse_documents([domain], "d")
    assert isinstance(loaded, RelayDomain)
    assert loaded.spec.domain == "xn--mnchen-3ya.de"


def test_secret_values_decode_and_bad_base64_is_refused() -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "creds"},
        "type": "kubernetes.io/basic-auth",
        "data": {"username": "YWxpY2U="},
        "stringData": {"password": "s3cret"},
    }
    [loaded] = parse_documents([secret], "s")
    assert isinstance(loaded, Secret)
    assert loaded.value("username") == b"alice"
    assert loaded.value("password") == b"s3cret"
    assert loaded.value("missing") is None
    with pytest.raises(ResourceError, match=r"data\.username is not valid base64"):
        parse_documents([{**secret, "data": {"username": "!!"}}], "s")


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ResourceError, match="cannot read"):
        load_resources(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [unclosed\n")
    with pytest.raises(ResourceError, match=r"broken\.yaml: not valid YAML"):
        load_resources(broken)
