"""Ingress decisions without sockets: relay policy, line endings, Received header."""

from __future__ import annotations

import pytest
from kurrier.core.loader import parse_documents
from kurrier.core.routing import RoutingTable, compile_table
from kurrier.ingress.line_endings import normalise_line_endings
from kurrier.ingress.received import protocol_name, received_header
from kurrier.ingress.relay_policy import check_recipient, check_sender, split_address


def _table() -> RoutingTable:
    documents = [
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": "in"},
            "spec": {"domain": "inbound.test", "acceptInbound": True},
        },
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": "class"},
            "spec": {"domain": "class.test", "acceptInbound": True},
        },
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": "listed"},
            "spec": {
                "domain": "listed.test",
                "acceptInbound": True,
                "recipients": ["alice", "Bob"],
            },
        },
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayRoute",
            "metadata": {"name": "r"},
            "spec": {
                "match": {
                    "recipientDomains": ["inbound.test", "class.test", "listed.test", "routed.test"]
                },
                "destination": {"smarthost": {"host": "h"}},
            },
        },
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayPolicy",
            "metadata": {"name": "p"},
            "spec": {"trustedNetworks": ["10.0.0.0/8"]},
        },
    ]
    return compile_table(parse_documents(documents, "t"))[0]


@pytest.mark.parametrize(
    ("client", "authenticated", "recipient", "reply"),
    [
        ("192.0.2.1", False, "a@inbound.test", None),
        ("192.0.2.1", False, "a@INBOUND.test", None),
        ("192.0.2.1", False, "a@routed.test", "554 5.7.1"),
        ("10.1.1.1", False, "a@routed.test", None),
        ("192.0.2.1", True, "a@routed.test", None),
        ("10.1.1.1", False, "a@unrouted.test", "451 4.4.0"),
        ("192.0.2.1", False, "a%b@inbound.test", "501 5.1.3"),
        ("192.0.2.1", False, "@relay.test:a@inbound.test", "501 5.1.3"),
        ("192.0.2.1", False, "a!b@inbound.test", "501 5.1.3"),
        ("192.0.2.1", False, "no-domain", "501 5.1.3"),
        ("192.0.2.1", False, "a@bad_domain", "501 5.1.3"),
        ("192.0.2.1", False, '"quoted local"@inbound.test', None),
        ("192.0.2.1", False, "jürgen@inbound.test", None),
        ("192.0.2.1", False, "a@\uff49nbound.test", None),  # full-width: the same domain
        ("192.0.2.1", False, "a@class.test", None),
        # IDNA 2003 folded ß to ss; IDNA 2008 keeps it: another domain (xn--cla-7ka.test).
        ("192.0.2.1", False, "a@cla\u00df.test", "554 5.7.1"),
        ("10.1.1.1", False, "a@\u2603.routed.test", "501 5.1.3"),
        # A domain that lists its mailboxes: the others are unknown to every client.
        ("192.0.2.1", False, "alice@listed.test", None),
        ("192.0.2.1", False, "ALICE@Listed.test", None),
        ("192.0.2.1", False, "bob@listed.test", None),
        ("192.0.2.1", False, "Postmaster@listed.test", None),
        ("192.0.2.1", False, "carol@listed.test", "550 5.1.1"),
        ("192.0.2.1", True, "carol@listed.test", "550 5.1.1"),
        ("10.1.1.1", False, "carol@listed.test", "550 5.1.1"),
        ("192.0.2.1", False, "alice+tag@listed.test", "550 5.1.1"),
        ("192.0.2.1", False, "carol@inbound.test", None),  # no list: any local part
    ],
)
def test_relay_decisions(
    client: str, authenticated: bool, recipient: str, reply: str | None
) -> None:
    result = check_recipient(_table(), client, authenticated, recipient, "")
    assert (result[:9] if result else None) == reply


def test_sender_syntax() -> None:
    assert check_sender("") is None
    assert check_sender("a@b.test") is None
    assert check_sender("junk") == "501 5.1.7 <junk>: bad sender address syntax"
    assert split_address("a@xn--mnchen-3ya.de") == ("a", "xn--mnchen-3ya.de")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        # The smuggling shape: <LF>.<CR><LF> must not survive as a bare LF before a dot.
        (b"x\n.\r\nMAIL FROM:<evil@x>\r\n", b"x\r\n.\r\nMAIL FROM:<evil@x>\r\n"),
        (b"x\r\r\n", b"x\r\n\r\n"),
    ],
)
def test_bare_line_endings_are_normalised(raw: bytes, clean: bytes) -> None:
    assert normalise_line_endings(raw) == clean


def test_received_header() -> None:
    header = received_header(
        helo="client(evil)\r\nX-Injected: yes",
        client_ip="192.0.2.7",
        hostname="relay.test",
        protocol=protocol_name(smtputf8=False, tls=True, authenticated=True),
        queue_id="ABC123DEF456",
        recipients=["one@example.com"],
        timestamp=0,
    )
    assert header == (
        b"Received: from client?evil???X-Injected:?yes ([192.0.2.7])\r\n"
        b"\tby relay.test (kurrier) with ESMTPSA id ABC123DEF456\r\n"
        b"\tfor <one@example.com>; Thu, 01 Jan 1970 00:00:00 -0000\r\n"
    )
    two = received_header(
        helo="h",
        client_ip="::1",
        hostname="r",
        protocol="UTF8SMTP",
        queue_id="Q",
        recipients=["a@x.test", "b@x.test"],
        timestamp=0,
    )
    assert b"for <" not in two
