"""One IDNA 2008 / UTS 46 normalisation for every domain decision (core/domains.py)."""

from __future__ import annotations

import pytest
from kurrier.core.domains import InvalidDomain, canonical_address, normalise_domain
from kurrier.core.loader import ResourceError, parse_documents
from kurrier.core.resources import SmarthostDestination
from kurrier.core.routing import domain_of
from pydantic import ValidationError


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        ("in.test", "in.test"),
        ("IN.Test.", "in.test"),
        # UTS 46 maps these to the plain name; IDNA 2003 did too, but ingress then
        # sent the spelling given on to the next hop.
        ("in.te\u200bst", "in.test"),  # zero-width space: ignored
        ("\uff49\uff4e.\uff54\uff45\uff53\uff54", "in.test"),  # full-width letters
        ("in\u3002test", "in.test"),  # ideographic full stop
        ("in.test\u3002", "in.test"),  # the root, spelled with another dot
        ("IN\uff0eTEST", "in.test"),  # full-width full stop and capitals
        # Non-transitional: ß is a letter of its own (IDNA 2003 made it "ss").
        ("cla\u00df.test", "xn--cla-7ka.test"),
        ("XN--CLA-7KA.test", "xn--cla-7ka.test"),
        ("b\u00fccher.test", "xn--bcher-kva.test"),
    ],
)
def test_mapped_names(given: str, normalised: str) -> None:
    assert normalise_domain(given) == normalised


@pytest.mark.parametrize(
    "given",
    [
        "\u2603.test",  # a symbol: disallowed in IDNA 2008, IDNA 2003 took it
        "xn--abc.test",  # an A-label that does not decode
        "a_b.test",  # STD3 rules
        "-a.test",
        "ab--cd.test",  # hyphens in the third and fourth place
        "a\u200db.test",  # a joiner without its context (CONTEXTJ)
        "in..test",
        "",
        "x" * 64 + ".test",
        ("x" * 60 + ".") * 5 + "test",  # over 253 octets
    ],
)
def test_refused_names(given: str) -> None:
    with pytest.raises(InvalidDomain, match="is not a valid domain name"):
        normalise_domain(given)


def test_addresses_keep_their_local_part() -> None:
    assert canonical_address("J\u00fcrgen@B\u00fccher.TEST") == "J\u00fcrgen@xn--bcher-kva.test"
    assert canonical_address('"a@b"@\uff49\uff4e.test') == '"a@b"@in.test'
    assert canonical_address("") == ""
    assert canonical_address("postmaster") == "postmaster"
    assert domain_of("u@cla\u00df.test") == "xn--cla-7ka.test"


def _domain(name: str) -> dict[str, object]:
    return {
        "apiVersion": "kurrier.io/v1alpha1",
        "kind": "RelayDomain",
        "metadata": {"name": "d"},
        "spec": {"domain": name},
    }


def test_resources_use_the_same_normalisation() -> None:
    [loaded] = parse_documents([_domain("cla\u00df.test")], "f.yaml")
    assert loaded.spec.domain == "xn--cla-7ka.test"  # type: ignore[union-attr]
    route = {
        "apiVersion": "kurrier.io/v1alpha1",
        "kind": "RelayRoute",
        "metadata": {"name": "r"},
        "spec": {
            "match": {
                "recipientDomains": ["*.IN\u3002test"],
                "senderDomains": ["\uff49\uff4e.test"],
            },
            "destination": {"mx": {}},
        },
    }
    [loaded] = parse_documents([route], "f.yaml")
    assert loaded.spec.match.recipientDomains == ["*.in.test"]  # type: ignore[union-attr]
    assert loaded.spec.match.senderDomains == ["in.test"]  # type: ignore[union-attr]


def test_an_invalid_resource_domain_is_refused_saying_why() -> None:
    # What `kurrier up` and `kurrier validate` print; the operator puts the same
    # message in the resource's Ready condition (reason Invalid).
    with pytest.raises(ResourceError) as refused:
        parse_documents([_domain("xn--abc.test")], "f.yaml")
    message = str(refused.value)
    assert "f.yaml: document 1 (RelayDomain 'd'): spec.domain:" in message
    assert "'xn--abc.test' is not a valid domain name: Codepoint U+0082" in message
    assert "\\x82" in message and "\x82" not in message  # escaped, fit for a status


@pytest.mark.parametrize(
    ("given", "host"),
    [
        ("smtp.Stra\u00dfe.example", "smtp.xn--strae-oqa.example"),  # IDNA 2003: strasse
        ("Mail.Example.NET", "mail.example.net"),
        ("192.0.2.25", "192.0.2.25"),
        ("2001:db8::25", "2001:db8::25"),
    ],
)
def test_a_smarthost_name_is_normalised_like_every_domain(given: str, host: str) -> None:
    assert SmarthostDestination(host=given).host == host


def test_a_smarthost_name_idna_refuses_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"'smtp_relay\.example' is not a valid domain name"):
        SmarthostDestination(host="smtp_relay.example")
