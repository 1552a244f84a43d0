"""The pure parts of ingress, without sockets: DATA reader, paths, limits, AUTH, replies."""

from __future__ import annotations

import argon2
import bcrypt
import pytest
from kurrier.core.loader import parse_documents
from kurrier.core.routing import CompiledPolicy, compile_table
from kurrier.ingress.connection_gate import ConnectionGate, client_key
from kurrier.ingress.data_reader import DataLimits, DataReader
from kurrier.ingress.handler import decode_plain
from kurrier.ingress.identities import password_matches
from kurrier.ingress.relay_policy import check_sender_identity
from kurrier.ingress.smtp_path import parse_path
from kurrier.ingress.smtp_replies import with_enhanced_code
from kurrier.ingress.token_buckets import TokenBuckets
from kurrier.ingress.token_review import looks_like_token


def _read(data: bytes, limits: DataLimits | None = None, step: int = 7) -> DataReader:
    reader = DataReader(limits or DataLimits(max_size=10_000))
    consumed = sum(reader.feed(data[i : i + step]) for i in range(0, len(data), step))
    assert reader.done
    assert (b"\r\n" + data[:consumed]).endswith(b"\r\n.\r\n")
    return reader


@pytest.mark.parametrize(
    ("wire", "stored"),
    [
        (b".\r\n", b""),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"..leading dot\r\n...two\r\n.\r\n", b".leading dot\r\n..two\r\n"),
        (b"bare\nlf\r\n.\r\n", b"bare\r\nlf\r\n"),
        (b"x\n.\nstill data\r\n.\r\n", b"x\r\n.\r\nstill data\r\n"),
        (b"x\r.\rstill\r\n.\r\n", b"x\r\n.\r\nstill\r\n"),
    ],
)
def test_data_reader_ends_only_on_crlf_dot_crlf(wire: bytes, stored: bytes) -> None:
    for step in (1, 2, 3, 1000):
        assert _read(wire + b"QUIT\r\n", step=step).content() == stored


@pytest.mark.parametrize(
    ("wire", "limits", "refusal"),
    [
        (
            b"h: v\r\n\r\n" + (b"x" * 98 + b"\r\n") * 200 + b".\r\n",
            DataLimits(max_size=9999),
            "552 5.3.4",
        ),
        (b"y" * 1001 + b"\r\n.\r\n", DataLimits(max_size=10_000), "552 5.6.0"),
        (b"y" * 5000 + b"\r\n.\r\n", DataLimits(max_size=1000), "552 5.6.0"),
        (b"a: b\r\n" * 11 + b"\r\n.\r\n", DataLimits(max_size=9999, max_headers=10), "552 5.6.0"),
        (b"a: b\r\n" * 99 + b"\r\n.\r\n", DataLimits(max_size=9999, max_header_size=64), "552"),
        (b"Received: x\r\n" * 4 + b"\r\n.\r\n", DataLimits(max_size=9999, max_hops=3), "554 5.4.6"),
    ],
)
def test_data_reader_limits(wire: bytes, limits: DataLimits, refusal: str) -> None:
    reader = _read(wire, limits)
    assert reader.refusal is not None and reader.refusal.startswith(refusal)
    assert reader.content() == b""


def test_data_reader_allows_a_full_line_with_a_transparency_dot() -> None:
    line = b"." + b"z" * 998 + b"\r\n"
    assert _read(line + b".\r\n").content() == line[1:]


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("<a@b.test>", ("a@b.test", "")),
        ("<a@b.test> SIZE=10 BODY=8BITMIME", ("a@b.test", "SIZE=10 BODY=8BITMIME")),
        ("<>", ("", "")),
        ("a@b.test", ("a@b.test", "")),
        ("<@relay.test,@x.test:a@b.test>", ("a@b.test", "")),
        ('<"x y"@b.test>', ('"x y"@b.test', "")),
        ("<jürgen@bücher.test>", ("jürgen@bücher.test", "")),
        ("<a@[192.0.2.1]>", ("a@[192.0.2.1]", "")),
        ("<a(comment)@b.test>", None),
        ("<a @ b.test>", None),
        ("<a@b.test>junk", None),
        ("<a@-b.test>", None),
        ("<a\r@b.test>", None),
        ("<a\u2028@b.test>", None),
        ("<\udcff@b.test>", None),
        (f"<{'a' * 65}@b.test>", None),
        ("<a@b>>", None),
    ],
)
def test_smtp_paths(text: str, parsed: tuple[str, str] | None) -> None:
    assert parse_path(text) == parsed


def test_token_buckets_refill_and_stay_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(clock=lambda: now[0], max_keys=2)
    assert [buckets.take("a", 2) for _ in range(3)] == [True, True, False]
    now[0] += 30  # half a minute: one token back
    assert buckets.take("a", 2) and not buckets.take("a", 2)
    buckets.take("b", 2)
    buckets.take("c", 2)
    assert len(buckets) == 2
    assert buckets.take("a", 2), "a forgotten key starts full"


def test_connection_gate() -> None:
    gate = ConnectionGate(max_total=3)
    assert gate.admit("192.0.2.1", 2) is None
    assert gate.admit("192.0.2.1", 2) is None
    assert (gate.admit("192.0.2.1", 2) or "").startswith("421 4.7.0")
    assert gate.admit("2001:db8::1", 1) is None
    assert (gate.admit("2001:db8::2", 1) or "").startswith("421"), "same /64, one client"
    gate.release("192.0.2.1")
    gate.draining = True
    assert (gate.admit("198.51.100.1", 2) or "").startswith("421 4.3.2")
    assert client_key("::ffff:192.0.2.9") == "192.0.2.9"


@pytest.mark.parametrize(
    ("reply", "enhanced"),
    [
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        ("500 Command line too long", "500 5.5.2 Command line too long"),
        ("554 5.7.1 relay access denied", "554 5.7.1 relay access denied"),
        ("250 OK", "250 OK"),
        ("599 odd", "599 5.0.0 odd"),
    ],
)
def test_enhanced_codes(reply: str, enhanced: str) -> None:
    assert with_enhanced_code(reply) == enhanced


def test_sasl_plain() -> None:
    assert decode_plain(b"\0user\0pass") == (b"user", b"pass")
    assert decode_plain(b"user\0user\0pass") == (b"user", b"pass")
    assert decode_plain(b"admin\0user\0pass") is None
    assert decode_plain(b"user\0pass") is None
    assert decode_plain(b"\0\0pass") is None


def test_password_hashes() -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    assert password_matches(hashed, b"pw") and not password_matches(hashed, b"no")
    assert not password_matches(hashed, b"x" * 100), "over bcrypt's 72 octets: a refusal"
    argon = argon2.PasswordHasher().hash("pw")
    assert password_matches(argon, b"pw") and not password_matches(argon, b"no")
    assert not password_matches("pw", b"pw"), "plain text is never a password"
    assert looks_like_token(b"eyJhbGciOi.eyJzdWIi.c2ln") and not looks_like_token(b"secret")


def test_plaintext_users_are_left_out_with_a_problem() -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    documents = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "users"},
            "stringData": {"good": hashed, "bad": "hunter2"},
        },
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayPolicy",
            "metadata": {"name": "p"},
            "spec": {
                "auth": {"usersSecretRef": {"name": "users"}},
                "maxConnectionsPerClient": 7,
                "rateLimit": {"perIdentityPerMinute": 9},
            },
        },
    ]
    table, problems = compile_table(parse_documents(documents, "t"))
    assert set(table.policy.users) == {"good"}
    assert [p.message for p in problems] == [
        "users Secret 'users': 'bad' is not a bcrypt or argon2 hash"
    ]
    assert "hunter2" not in repr(problems)
    assert table.policy.max_connections_per_client == 7
    assert table.policy.identity_rate_per_minute == 9 and table.policy.rate_per_minute is None


@pytest.mark.parametrize(
    ("identity", "trusted", "sender", "allowed"),
    [
        ("alice", False, "a@alice.test", True),
        ("alice", False, "a@sub.alice.test", False),
        ("alice", False, "a@other.test", False),
        ("bob", False, "b@x.bob.test", True),
        ("", False, "ceo@alice.test", False),
        ("", True, "ceo@alice.test", True),
        ("", False, "someone@elsewhere.test", True),
        ("alice", False, "", True),
    ],
)
def test_sender_rules(identity: str, trusted: bool, sender: str, allowed: bool) -> None:
    policy = CompiledPolicy(
        sender_rules=(("alice", ("alice.test",)), ("bob", ("*.bob.test",)), ("svc", ("*",)))
    )
    refusal = check_sender_identity(policy, identity, trusted, sender)
    assert (refusal is None) == allowed, refusal
    assert refusal is None or refusal.startswith("553 5.7.1")
