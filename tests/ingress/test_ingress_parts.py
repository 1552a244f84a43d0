"""The pure parts of ingress, without sockets: DATA reader, paths, limits, AUTH, replies."""

from __future__ import annotations

import asyncio

import argon2
import bcrypt
import pytest
from kurrier.core.loader import parse_documents
from kurrier.core.routing import CompiledPolicy, RoutingTable, compile_table
from kurrier.delivery.smtp_client import to_wire_body
from kurrier.ingress.command_lines import BARE_NEWLINE_COMMAND, BareNewline, CommandLineReader
from kurrier.ingress.connection_gate import client_key
from kurrier.ingress.data_reader import DataLimits, DataReader
from kurrier.ingress.data_stream import read_data
from kurrier.ingress.handler import decode_plain
from kurrier.ingress.identities import password_matches
from kurrier.ingress.relay_policy import check_recipient, check_sender_identity, recipient_key
from kurrier.ingress.smtp_path import parse_path
from kurrier.ingress.smtp_replies import safe_reply, with_enhanced_code
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


class _CountingReader(DataReader):
    feeds = 0

    def feed(self, data: bytes) -> int:
        self.feeds += 1
        return super().feed(data)


async def test_prose_is_read_in_blocks_not_a_read_per_sentence() -> None:
    """Lines ending in a full stop hold ".<CRLF>" but never the terminator: 100 KB
    of them come in reads of the stream's limit, with the next command left."""
    prose = b"A line of a letter, which ends as most sentences do." + b"\r\n"
    message = b"Subject: a letter\r\n\r\n" + prose * 2000
    stream = asyncio.StreamReader(limit=64 * 1024)
    stream.feed_data(message + b".\r\nQUIT\r\n")
    reader = _CountingReader(DataLimits(max_size=1024 * 1024))
    assert await read_data(stream, reader)
    assert reader.refusal is None and reader.content() == message
    assert reader.feeds <= 3
    assert await stream.readline() == b"QUIT\r\n"


def test_data_reader_allows_a_full_line_with_a_transparency_dot() -> None:
    line = b"." + b"z" * 998 + b"\r\n"
    assert _read(line + b".\r\n").content() == line[1:]


@pytest.mark.parametrize(
    ("wire", "accepted"),
    [
        (b"y" * 998 + b"\r\n", True),
        (b"y" * 999 + b"\r\n", False),  # 1001 octets with CRLF (RFC 5321 4.5.3.1.6)
        # Stored ".z*996" is sent dot-stuffed again: 998 octets and CRLF.
        (b".." + b"z" * 996 + b"\r\n", True),
        (b".." + b"z" * 997 + b"\r\n", False),
        # After a bare LF nothing is unstuffed, but delivery stuffs the dot.
        (b"a\n." + b"x" * 996 + b"\r\n", True),
        (b"a\n." + b"x" * 997 + b"\r\n", False),
        (b"trigger\n." + b"x" * 998 + b"\r\n", False),  # the backscatter trigger
        (b"a\r" + b"x" * 998 + b"\r\n", True),
        (b"a\r" + b"x" * 999 + b"\r\n", False),
        (b"a\r\r." + b"x" * 997 + b"\r\n", False),
        (b"a\r\n." + b"x" * 998 + b"\nb\r\n", True),
    ],
)
def test_data_reader_measures_each_line_as_delivery_sends_it(wire: bytes, accepted: bool) -> None:
    limits = DataLimits(max_size=10_000)
    for step in (1, 7, 999, 5000):
        reader = _read(wire + b".\r\n", limits, step=step)
        assert (reader.refusal is None) == accepted, (step, reader.refusal)
        if accepted:
            sent = to_wire_body(reader.content())
            assert max(map(len, sent.split(b"\r\n"))) + 2 <= 1000
        else:
            assert reader.refusal is not None and reader.refusal.startswith("552 5.6.0")


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


def test_client_keys() -> None:
    assert client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("2001:db8::1") == client_key("2001:db8::2"), "same /64, one client"
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


@pytest.mark.parametrize(
    ("reply", "safe"),
    [
        ('500 Error: command "NO\x00OP" not recognized', "500 Error: command not recognized"),
        ('500 Error: command "X\x1b[2J" not recognized', "500 Error: command not recognized"),
        ("502 Could not VRFY \x01\x07\x1b[0m\r\n\x85\u2028", "502 Could not VRFY [0m"),
        ("501 Syntax: VRFY \udcff<x>", "501 Syntax: VRFY <x>"),
        (
            "502 5.5.1 Too many unrecognized commands, goodbye.",
            "421 4.7.0 Too many unrecognized commands, closing connection",
        ),
        # Format characters: a bidi override would show the address reversed.
        ("554 5.7.1 <\u202eresu@x\u200b.test>: no", "554 5.7.1 <resu@x.test>: no"),
        ("553 5.6.7 <jürgen@bücher.test>: a non-ASCII address needs SMTPUTF8", None),
        ("250 2.0.0 Ok: queued as 01J", None),
    ],
)
def test_replies_never_echo_control_characters(reply: str, safe: str | None) -> None:
    assert safe_reply(reply) == (safe or reply)


def _command_lines(wire: bytes, count: int) -> list[bytes]:
    async def read() -> list[bytes]:
        reader = CommandLineReader()
        reader.feed_data(wire)
        reader.feed_eof()
        return [await reader.readuntil() for _ in range(count)]

    return asyncio.run(read())


def test_command_lines_end_in_crlf_only() -> None:
    lf, cr = (f"{BARE_NEWLINE_COMMAND} {kind}\r\n".encode() for kind in ("LF", "CR"))
    lines = _command_lines(b"NOOP\r\nMAIL FROM:<a@b.test>\nRSET\rQUIT\r\nX\r\r\nDATA\r\n", 5)
    assert lines == [b"NOOP\r\n", lf, cr, cr, b"DATA\r\n"]
    # Whatever aiosmtpd does with a line, it cuts it at the first LF: an LF inside
    # the marker cannot come from a client.
    assert b"\n" in BARE_NEWLINE_COMMAND.encode().rstrip(b"\n")

    # DATA's reads name their separator and pass through; AUTH's answers to 334
    # (readline) follow the commands' rule.
    async def other_reads() -> tuple[bytes, bytes, str]:
        reader = CommandLineReader()
        reader.feed_data(b"abc\n.\r\nYWxpY2U=\r\nYWxpY2U=\n")
        data = await reader.readuntil(b".\r\n")
        answer = await reader.readline()
        with pytest.raises(BareNewline) as refused:
            await reader.readline()
        return data, answer, refused.value.kind

    assert asyncio.run(other_reads()) == (b"abc\n.\r\n", b"YWxpY2U=\r\n", "LF")


def _postmaster_table(routed: bool) -> RoutingTable:
    documents = [
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": "in"},
            "spec": {"domain": "in.test", "acceptInbound": True},
        },
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayRoute",
            "metadata": {"name": "r"},
            "spec": {
                "match": {"recipientDomains": ["in.test", "relay.test"] if routed else ["in.test"]},
                "destination": {"smarthost": {"host": "h"}},
            },
        },
    ]
    return compile_table(parse_documents(documents, "t"))[0]


@pytest.mark.parametrize(
    ("recipient", "routed", "reply"),
    [
        ("postmaster@relay.test", True, None),
        ("PostMaster@Relay.Test", True, None),
        ("postmaster@relay.test", False, "451 4.4.0"),
        ("root@relay.test", True, "554 5.7.1"),
        ("postmaster@elsewhere.test", True, "554 5.7.1"),
        ("user@in.test", False, None),
    ],
)
def test_the_relays_postmaster_is_open_to_anyone(
    recipient: str, routed: bool, reply: str | None
) -> None:
    table = _postmaster_table(routed)
    result = check_recipient(
        table, "192.0.2.1", False, recipient, "", postmaster_domain="relay.test"
    )
    assert (result[:9] if result else None) == reply


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("user@in.test", "user@in.test", True),
        ("user@in.test", "user@IN.Test", True),
        ("user@in.test", "user@In.Test.", True),
        ("user@bücher.test", "user@xn--bcher-kva.test", True),
        ("user@in.test", "User@in.test", False),  # RFC 5321 2.4: local parts are the destination's
        ('"user"@in.test', "user@in.test", False),
        ("Postmaster@in.test", "postmaster@in.test", True),  # RFC 5321 4.5.1
    ],
)
def test_duplicate_recipients(first: str, second: str, same: bool) -> None:
    assert (recipient_key(first) == recipient_key(second)) == same
    assert recipient_key(first) is not None


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
