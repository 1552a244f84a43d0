"""Hostile probes against a running relay, each with the reply it must get.

One relay (conftest.hostile_relay: real ingress, queue, delivery, NATS and a
sink) takes every probe on real sockets; each probe is a scripted SMTP
conversation from its own loopback address.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import pytest

from tests.ingress.conftest import (
    MAX_RECIPIENTS,
    PASSWORDS,
    TRUSTED_IP,
    HostileRelay,
    fresh_ip,
)
from tests.ingress.smtp_probe import SmtpProbe, plain

STARTTLS = "STARTTLS"


@dataclass(frozen=True)
class Step:
    send: str | bytes  # str: one command line (CRLF added); bytes: sent exactly as given
    expect: str  # the reply's last line starts with this
    contains: str | None = None  # and some line of the reply contains this
    absent: str | None = None  # and no line of the reply contains this


@dataclass(frozen=True)
class Probe:
    name: str
    steps: list[Step]
    port: str = "smtp"  # smtp, submission or smtps
    source: str = field(default="fresh")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


EHLO = Step("EHLO probe.test", "250")
MAIL = Step("MAIL FROM:<someone@client.test>", "250 2.1.0")
TLS = [EHLO, Step(STARTTLS, "220"), EHLO]
DATA = [EHLO, MAIL, Step("RCPT TO:<user@example.com>", "250"), Step("DATA", "354")]


# Ten ideographs: 30 octets of UTF-8, 39 as an A-label.
CJK_LABEL = "".join(chr(0x4E00 + (n * 7919) % 20000) for n in range(10))


def message(body: bytes) -> bytes:
    return b"Subject: probe\r\n\r\n" + body + b"\r\n.\r\n"


def padded_mail(length: int) -> str:
    """A MAIL command of length octets (without CRLF), padded with spaces before SIZE."""
    start, end = "MAIL FROM:<a@client.test>", " SIZE=1"
    return start + " " * (length - len(start) - len(end)) + end


def padded_rcpt(length: int) -> str:
    """A RCPT command of length octets (without CRLF), padded with spaces before NOTIFY."""
    start, end = "RCPT TO:<user@example.com>", " NOTIFY=NEVER"
    return start + " " * (length - len(start) - len(end)) + end


PROBES = [
    # Open relay attempts
    Probe(
        "untrusted client relaying elsewhere",
        [EHLO, MAIL, Step("RCPT TO:<victim@elsewhere.test>", "554 5.7.1")],
    ),
    Probe(
        "trusted network may relay",
        [EHLO, MAIL, Step("RCPT TO:<friend@elsewhere.test>", "250 2.1.5")],
        source=TRUSTED_IP,
    ),
    Probe(
        "inbound domain from anyone",
        [EHLO, MAIL, Step("RCPT TO:<user@example.com>", "250 2.1.5")],
    ),
    Probe(
        "percent hack",
        [EHLO, MAIL, Step("RCPT TO:<victim%elsewhere.test@example.com>", "501 5.1.3")],
    ),
    Probe(
        "bang path",
        [EHLO, MAIL, Step("RCPT TO:<elsewhere.test!victim@example.com>", "501 5.1.3")],
    ),
    Probe(
        "source route through our domain is ignored, so the relay check sees the real target",
        [EHLO, MAIL, Step("RCPT TO:<@example.com:victim@elsewhere.test>", "554 5.7.1")],
    ),
    Probe(
        "source route to our domain is ignored",
        [EHLO, MAIL, Step("RCPT TO:<@elsewhere.test,@x.test:user@example.com>", "250 2.1.5")],
    ),
    Probe(
        "quoted local part hiding a remote address",
        [EHLO, MAIL, Step('RCPT TO:<"victim@elsewhere.test"@example.com>', "501 5.1.3")],
    ),
    Probe(
        "quoted local part hiding a percent hack",
        [EHLO, MAIL, Step('RCPT TO:<"victim%elsewhere.test"@example.com>', "501 5.1.3")],
    ),
    Probe(
        "harmless quoted local part",
        [EHLO, MAIL, Step('RCPT TO:<"john smith"@example.com>', "250 2.1.5")],
    ),
    Probe(
        "forged local sender (a domain of the sender rules) without AUTH",
        [EHLO, Step("MAIL FROM:<ceo@alice.test>", "553 5.7.1")],
    ),
    Probe(
        "a trusted network may use a local sender",
        [EHLO, Step("MAIL FROM:<ceo@alice.test>", "250 2.1.0")],
        source=TRUSTED_IP,
    ),
    Probe(
        "null sender (bounces) accepted for an inbound domain",
        [EHLO, Step("MAIL FROM:<>", "250 2.1.0"), Step("RCPT TO:<user@example.com>", "250")],
    ),
    # RFC 5321 4.5.1: the relay's postmaster, from anyone; "<postmaster>" is the
    # one at the relay's hostname (relay.test here), routed like any other.
    Probe("postmaster without a domain", [EHLO, MAIL, Step("RCPT TO:<postmaster>", "250 2.1.5")]),
    Probe("PostMaster in any case", [EHLO, MAIL, Step("RCPT TO:<PostMaster>", "250 2.1.5")]),
    Probe(
        "postmaster at the relay's hostname",
        [EHLO, MAIL, Step("RCPT TO:<postmaster@relay.test>", "250 2.1.5")],
    ),
    Probe(
        "anyone else at the relay's hostname is relaying",
        [EHLO, MAIL, Step("RCPT TO:<root@relay.test>", "554 5.7.1")],
    ),
    Probe("postmaster is no sender", [EHLO, Step("MAIL FROM:<postmaster>", "553 5.1.3")]),
    Probe(
        "null sender cannot be a recipient",
        [EHLO, MAIL, Step("RCPT TO:<>", "501 5.1.3")],
    ),
    # Address syntax
    Probe("comment in an address", [EHLO, Step("MAIL FROM:<a(c)@client.test>", "553 5.1.3")]),
    Probe("spaces around @", [EHLO, Step("MAIL FROM:<a @ client.test>", "553 5.1.3")]),
    Probe(
        "local part over 64 octets",
        [EHLO, Step(f"MAIL FROM:<{'a' * 65}@client.test>", "553 5.1.3")],
    ),
    Probe("no domain", [EHLO, Step("MAIL FROM:<nobody>", "553 5.1.3")]),
    Probe(
        "non-ASCII address without SMTPUTF8",
        [EHLO, Step("MAIL FROM:<jürgen@client.test>", "553 5.6.7")],
    ),
    Probe(
        "non-ASCII address with SMTPUTF8",
        [EHLO, Step("MAIL FROM:<jürgen@client.test> SMTPUTF8", "250 2.1.0")],
    ),
    # Domains as IDNA 2008 with UTS 46 mapping sees them (core/domains.py)
    Probe(
        "a symbol in a domain: IDNA 2003 took it, IDNA 2008 does not",
        [
            EHLO,
            Step("MAIL FROM:<someone@client.test> SMTPUTF8", "250 2.1.0"),
            Step("RCPT TO:<user@\u2603.example.com>", "501 5.1.3"),
        ],
        source=TRUSTED_IP,
    ),
    Probe(
        "an xn-- label that does not decode",
        [EHLO, MAIL, Step("RCPT TO:<user@xn--abc.example.com>", "501 5.1.3")],
        source=TRUSTED_IP,
    ),
    Probe(
        "hyphens in a label's third and fourth place",
        [EHLO, Step("MAIL FROM:<a@ab--cd.client.test>", "501 5.1.7")],
    ),
    Probe(
        "a full-width look-alike of a foreign domain is that foreign domain",
        [
            EHLO,
            Step("MAIL FROM:<someone@client.test> SMTPUTF8", "250 2.1.0"),
            Step("RCPT TO:<victim@\uff45lsewhere.test>", "554 5.7.1"),
        ],
    ),
    Probe(
        "a path of 252 octets as given, but of 306 as A-labels",
        [
            EHLO,
            Step("MAIL FROM:<someone@client.test> SMTPUTF8", "250 2.1.0"),
            Step(f"RCPT TO:<{'u' * 64}@{'.'.join([CJK_LABEL] * 6)}>", "501 5.1.3"),
        ],
        source=TRUSTED_IP,
    ),
    Probe(
        "undecodable octets in an address",
        [EHLO, Step(b"MAIL FROM:<\xff\xfe@client.test>\r\n", "553 5.1.3")],
    ),
    Probe(
        "a bare CR smuggling a header into an address",
        [EHLO, Step(b"MAIL FROM:<a\rBcc: x@client.test>\r\n", "500 5.5.2", contains="bare <CR>")],
    ),
    Probe(
        "unknown MAIL parameter",
        [EHLO, Step("MAIL FROM:<a@client.test> EVIL=1", "555 5.5.4")],
    ),
    # Protocol order
    Probe("MAIL before EHLO", [Step("MAIL FROM:<a@client.test>", "503 5.5.1")]),
    Probe("RCPT before MAIL", [EHLO, Step("RCPT TO:<user@example.com>", "503 5.5.1")]),
    Probe("DATA before RCPT", [EHLO, MAIL, Step("DATA", "503 5.5.1")]),
    Probe("2000-byte command line", [EHLO, Step("NOOP " + "x" * 2000, "500 5.5.2")]),
    # RFC 5321 4.5.3.1.4: 512 octets with CRLF is the least a server must take;
    # aiosmtpd takes 512 and the CRLF. SIZE (RFC 1870) adds 26 to MAIL, SMTPUTF8
    # (RFC 6531) 10, DSN (RFC 3461) 110 to MAIL and 500 to RCPT, REQUIRETLS
    # (RFC 8689) 11 to MAIL.
    Probe("512-octet command line", [EHLO, Step("NOOP " + "x" * 507, "250")]),
    Probe("513-octet command line", [EHLO, Step("NOOP " + "x" * 508, "500 5.5.2")]),
    Probe("669-octet MAIL after EHLO", [EHLO, Step(padded_mail(669), "250 2.1.0")]),
    Probe("670-octet MAIL after EHLO", [EHLO, Step(padded_mail(670), "500 5.5.2")]),
    Probe("1012-octet RCPT", [EHLO, MAIL, Step(padded_rcpt(1012), "250 2.1.5")]),
    Probe("1013-octet RCPT", [EHLO, MAIL, Step(padded_rcpt(1013), "500 5.5.2")]),
    # Command lines end in CRLF only (RFC 5321 2.3.8; Postfix's smtpd_forbid_bare_newline)
    Probe(
        "a command ending in a bare LF is refused, not carried out",
        [
            EHLO,
            Step(b"MAIL FROM:<a@client.test>\n", "500 5.5.2", contains="bare <LF>"),
            Step("RCPT TO:<user@example.com>", "503 5.5.1"),
        ],
    ),
    Probe(
        "a bare LF ending DATA's command line",
        [EHLO, MAIL, Step("RCPT TO:<user@example.com>", "250"), Step(b"DATA\n", "500 5.5.2")],
    ),
    Probe(
        "a bare CR inside a command line",
        [EHLO, Step(b"NOOP\rRSET\r\n", "500 5.5.2", contains="bare <CR>", absent="\r")],
    ),
    # No client bytes echoed raw in a reply
    Probe(
        "a NUL in a command",
        [EHLO, Step(b"NO\x00OP\r\n", "500 5.5.2", absent="\x00")],
    ),
    Probe(
        "an escape sequence as a command",
        [EHLO, Step(b"\x1b[2J\x1b]0;pwned\x07\r\n", "500 5.5.2", absent="\x1b")],
    ),
    Probe(
        "an unknown command is not echoed",
        [EHLO, Step("XYZZY-" + "A" * 200, "500 5.5.2", absent="XYZZY")],
    ),
    Probe(
        "five unknown commands end the session with a 421, as a server closing says",
        [
            EHLO,
            *[Step(f"XYZZY{n}", "500 5.5.2") for n in range(4)],
            Step("XYZZY4", "421 4.7.0"),
        ],
    ),
    Probe(
        "control bytes in VRFY",
        [EHLO, Step(b"VRFY \x01\x07\x7f\xc2\x85x\r\n", "502", absent="\x07")],
    ),
    Probe(
        "a bidi override in a refused address is not echoed",
        [
            EHLO,
            Step("MAIL FROM:<someone@client.test> SMTPUTF8", "250 2.1.0"),
            Step("RCPT TO:<\u202emoc.elpmaxe@elsewhere.test>", "554 5.7.1", absent="\u202e"),
        ],
    ),
    Probe(
        "undecodable octets in VRFY",
        [EHLO, Step(b"VRFY \xff\r\n", "502 5.5.1")],
    ),
    # Limits
    Probe(
        "too many recipients",
        [
            EHLO,
            MAIL,
            *[Step(f"RCPT TO:<u{n}@example.com>", "250") for n in range(MAX_RECIPIENTS)],
            Step("RCPT TO:<one-more@example.com>", "452 4.5.3"),
        ],
    ),
    Probe(
        "the same recipient again is one recipient, and maxRecipients counts it once",
        [
            EHLO,
            MAIL,
            *[Step(f"RCPT TO:<u{n}@example.com>", "250 2.1.5") for n in range(MAX_RECIPIENTS)],
            Step("RCPT TO:<u0@example.com>", "250 2.1.5"),
            Step("RCPT TO:<u0@EXAMPLE.Com>", "250 2.1.5"),
            Step("RCPT TO:<U0@example.com>", "452 4.5.3"),  # local parts compare exactly
        ],
    ),
    Probe(
        "declared SIZE over the limit",
        [EHLO, Step("MAIL FROM:<a@client.test> SIZE=100000000", "552 5.3.4")],
    ),
    Probe(
        "EHLO advertises the limit as SIZE",
        [Step("EHLO probe.test", "250", contains="SIZE 65536")],
    ),
    Probe(
        "oversize DATA is refused at the end, and the session goes on",
        [
            EHLO,
            MAIL,
            Step("RCPT TO:<user@example.com>", "250"),
            Step("DATA", "354"),
            Step(message(b"0123456789abcdef\r\n" * 5000), "552 5.3.4"),
            Step("RSET", "250"),
        ],
    ),
    Probe(
        "a 2000-byte line in DATA",
        [
            EHLO,
            MAIL,
            Step("RCPT TO:<user@example.com>", "250"),
            Step("DATA", "354"),
            Step(message(b"x" * 2000), "552 5.6.0"),
        ],
    ),
    # Lines as the next hop will get them: 1000 octets with CRLF (RFC 5321
    # 4.5.3.1.6), after bare CR/LF became CRLF and with delivery's dot-stuffing.
    # Over it, the next hop refuses and the bounce goes to any MAIL FROM given.
    Probe(
        "a line over-long only as sent (bare LF, then dot-stuffing): no backscatter",
        [
            EHLO,
            Step("MAIL FROM:<victim@outside.test>", "250"),
            Step("RCPT TO:<user@example.com>", "250"),
            Step("DATA", "354"),
            Step(message(b"trigger\n." + b"x" * 998), "552 5.6.0"),
        ],
    ),
    Probe(
        "a line that delivery's dot-stuffing takes to 1001 octets",
        [*DATA, Step(message(b"trigger\n." + b"x" * 997), "552 5.6.0")],
    ),
    Probe(
        "a line that dot-stuffing takes to 1000 octets",
        [*DATA, Step(message(b"trigger\n." + b"x" * 996), "250 2.0.0")],
    ),
    Probe("a 999-octet line and CRLF", [*DATA, Step(message(b"y" * 999), "552 5.6.0")]),
    Probe("a 998-octet line and CRLF", [*DATA, Step(message(b"y" * 998), "250 2.0.0")]),
    Probe(
        "too many header fields",
        [
            EHLO,
            MAIL,
            Step("RCPT TO:<user@example.com>", "250"),
            Step("DATA", "354"),
            Step(b"".join(b"X-H%d: v\r\n" % n for n in range(30)) + b"\r\nbody\r\n.\r\n", "552"),
        ],
    ),
    Probe(
        "a mail loop (60 Received headers)",
        [
            EHLO,
            MAIL,
            Step("RCPT TO:<user@example.com>", "250"),
            Step("DATA", "354"),
            Step(b"Received: from x by y\r\n" * 60 + b"\r\nbody\r\n.\r\n", "554 5.4.6"),
        ],
    ),
    # AUTH
    Probe("AUTH on port 25", [EHLO, Step(plain("alice", PASSWORDS["alice"]), "503 5.5.1")]),
    Probe(
        "AUTH with only Unicode whitespace (U+0085) as its argument",
        [EHLO, Step("AUTH \u0085".encode() + b"\r\n", "501 5.5.4")],
    ),
    Probe(
        "no AUTH offered before STARTTLS",
        [Step("EHLO probe.test", "250", absent="AUTH")],
        port="submission",
    ),
    Probe(
        "AUTH before STARTTLS",
        [EHLO, Step(plain("alice", PASSWORDS["alice"]), "538 5.7.11")],
        port="submission",
    ),
    Probe(
        "wrong password",
        [*TLS, Step(plain("alice", "guess"), "535 5.7.8")],
        port="submission",
    ),
    Probe(
        "unknown user",
        [*TLS, Step(plain("mallory", "guess"), "535 5.7.8")],
        port="submission",
    ),
    Probe(
        "acting for another user (PLAIN authzid)",
        [*TLS, Step(plain("alice", PASSWORDS["alice"], authzid="bob"), "501 5.5.2")],
        port="submission",
    ),
    Probe(
        "bcrypt user, then a sender outside the user's rules",
        [
            *TLS,
            Step(plain("alice", PASSWORDS["alice"]), "235 2.7.0"),
            Step("MAIL FROM:<alice@bob.test>", "553 5.7.1"),
            Step("MAIL FROM:<alice@alice.test>", "250 2.1.0"),
            Step("RCPT TO:<anyone@elsewhere.test>", "250 2.1.5"),
        ],
        port="submission",
    ),
    Probe(
        "argon2 user with AUTH LOGIN, sender in a wildcard rule",
        [
            *TLS,
            Step("AUTH LOGIN", "334"),
            Step(b64("bob"), "334"),
            Step(b64(PASSWORDS["bob"]), "235 2.7.0"),
            Step("MAIL FROM:<bob@mail.bob.test>", "250 2.1.0"),
        ],
        port="submission",
    ),
    Probe(
        "AUTH aborted with *",
        [*TLS, Step("AUTH LOGIN", "334"), Step("*", "501")],
        port="submission",
    ),
    # An answer to a 334 is a line like a command's: CRLF only (command_lines.py)
    Probe(
        "an AUTH answer ending in a bare LF is refused, and the session goes on",
        [
            *TLS,
            Step("AUTH LOGIN", "334"),
            Step(b64("alice").encode() + b"\n", "500 5.5.2", contains="bare <LF>"),
            Step("NOOP", "250"),
        ],
        port="submission",
    ),
    Probe(
        "an AUTH answer with a bare CR inside",
        [
            *TLS,
            Step("AUTH PLAIN", "334"),
            Step(b"AGFsaWNl\rAGd1ZXNz\r\n", "500 5.5.2", contains="bare <CR>", absent="\r"),
            Step("NOOP", "250"),
        ],
        port="submission",
    ),
    Probe(
        "implicit TLS offers AUTH",
        [
            Step("EHLO probe.test", "250", contains="AUTH LOGIN PLAIN"),
            Step(plain("alice", "x"), "535"),
        ],
        port="smtps",
    ),
    Probe("STARTTLS twice", [*TLS, Step(STARTTLS, "503 5.5.1")], port="submission"),
    Probe("STARTTLS on implicit TLS", [EHLO, Step(STARTTLS, "503 5.5.1")], port="smtps"),
]


def _port(relay: HostileRelay, name: str) -> int:
    return {"smtp": relay.smtp_port, "submission": relay.submission_port}.get(
        name, relay.smtps_port
    )


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
def test_probe(hostile_relay: HostileRelay, probe: Probe) -> None:
    source = fresh_ip() if probe.source == "fresh" else probe.source
    port = _port(hostile_relay, probe.port)
    with SmtpProbe(port, source, implicit_tls=probe.port == "smtps") as smtp:
        assert smtp.reply().code == 220
        for number, step in enumerate(probe.steps):
            if step.send == STARTTLS:
                reply = smtp.starttls()
            elif isinstance(step.send, bytes):
                smtp.send(step.send)
                reply = smtp.reply()
            else:
                reply = smtp.command(step.send)
            where = f"step {number} ({step.send!r:.60}): {reply.text!r}"
            assert reply.startswith(step.expect), where
            assert step.contains is None or step.contains in reply.text, where
            assert step.absent is None or step.absent not in reply.text, where
