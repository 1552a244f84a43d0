"""Limits that need time, many connections or a look at what was delivered."""

from __future__ import annotations

import select
import time
import uuid
from contextlib import ExitStack

import pytest
from kurrier.ingress.smtp_session import IDLE_TIMEOUT as IDLE_GOODBYE
from kurrier.ingress.smtp_session import SESSION_TIMEOUT as SESSION_GOODBYE

from tests.ingress.conftest import (
    AUTH_FAILURES_PER_MINUTE,
    CONNECTIONS_PER_CLIENT,
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    MESSAGES_PER_CLIENT_MINUTE,
    MESSAGES_PER_IDENTITY_MINUTE,
    PASSWORDS,
    SESSION_TIMEOUT,
    TRUSTED_IP,
    HostileRelay,
    fresh_ip,
)
from tests.ingress.smtp_probe import SmtpProbe, plain
from tests.support.processes import wait_until
from tests.support.relay import message_records
from tests.support.sink import Received


def _greeted(relay: HostileRelay, ip: str, port: int | None = None) -> SmtpProbe:
    smtp = SmtpProbe(port or relay.smtp_port, ip)
    assert smtp.reply().code == 220
    return smtp


def _greeting(relay: HostileRelay, ip: str) -> int:
    with SmtpProbe(relay.smtp_port, ip) as smtp:
        return smtp.reply().code


def test_a_silent_client_is_dropped_after_the_idle_timeout(hostile_relay: HostileRelay) -> None:
    started = time.monotonic()  # before the server could start counting
    with _greeted(hostile_relay, fresh_ip()) as smtp:
        # The idle timer's goodbye, not the longer session limit's.
        assert smtp.reply().text == IDLE_GOODBYE
        assert smtp.closed_by_server()
    assert time.monotonic() - started >= IDLE_TIMEOUT


def test_slowloris_dribbling_a_command_is_dropped(hostile_relay: HostileRelay) -> None:
    """Bytes that never make a line are no activity: the idle timeout ends the session,
    long before the session limit or the line limit would."""
    started = time.monotonic()
    with _greeted(hostile_relay, fresh_ip()) as smtp:
        for byte in b"EHLO " + b"x" * 1000:
            smtp.send(bytes([byte]))
            # The attack's pace, one byte in 0.2 s, watching for the server's answer.
            if select.select([smtp.sock], [], [], 0.2)[0]:
                break
        assert smtp.reply().text == IDLE_GOODBYE
        assert smtp.closed_by_server()
    assert time.monotonic() - started >= IDLE_TIMEOUT


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
def test_a_client_sending_content_slowly_is_not_idle(
    hostile_relay: HostileRelay, command: str
) -> None:
    """Octets of a message arriving are activity, however few: content that comes in
    small pieces for longer than the idle timeout, never a whole read's worth, is
    taken. (Dribbling a command is not: test_slowloris_dribbling_a_command_is_dropped.)"""
    pieces = [f"Subject: slow {command}\r\n\r\n".encode(), *[b"x" * 40 + b"\r\n"] * 5]
    with _greeted(hostile_relay, fresh_ip()) as smtp:
        smtp.command("EHLO probe.test")
        smtp.command("MAIL FROM:<someone@client.test>")
        assert smtp.command("RCPT TO:<user@example.com>").code == 250
        if command == "DATA":
            assert smtp.command("DATA").code == 354
        else:
            smtp.send(f"BDAT {sum(map(len, pieces))} LAST\r\n".encode())
        started = time.monotonic()
        # Well inside the session limit: the pieces take 1.25 idle timeouts.
        for index, piece in enumerate(pieces):
            if index:
                time.sleep(IDLE_TIMEOUT / 4)  # the client's pace, not a wait for the server
            smtp.send(piece)
        assert time.monotonic() - started > IDLE_TIMEOUT
        if command == "DATA":
            smtp.send(b".\r\n")
        assert smtp.reply().startswith("250 2.0.0")


def test_a_busy_client_is_dropped_at_the_session_limit(hostile_relay: HostileRelay) -> None:
    started = time.monotonic()  # before the server could start counting
    with _greeted(hostile_relay, fresh_ip()) as smtp:
        # Always active, never idle: a NOOP every eighth of the idle timeout, until the
        # session limit ends it (the NOOP budget of 50 bounds the loop).
        for _ in range(50):
            reply = smtp.command("NOOP")
            if reply.code != 250:
                break
            time.sleep(IDLE_TIMEOUT / 8)  # the client's pace, not a wait for the server
        assert reply.text == SESSION_GOODBYE
        assert smtp.closed_by_server()
    assert time.monotonic() - started >= SESSION_TIMEOUT


def test_connections_per_client_and_in_total(hostile_relay: HostileRelay) -> None:
    ip = fresh_ip()
    with ExitStack() as stack:
        for _ in range(CONNECTIONS_PER_CLIENT):
            stack.enter_context(_greeted(hostile_relay, ip))
        with SmtpProbe(hostile_relay.smtp_port, ip) as refused:
            assert refused.reply().startswith("421 4.7.0")
            assert refused.closed_by_server()
        assert _greeting(hostile_relay, fresh_ip()) == 220, "other clients are not affected"
    # Slots are given back when connections close.
    wait_until(lambda: _greeting(hostile_relay, ip) == 220, 10, "the client's slots to free up")

    with ExitStack() as stack:
        opened = 0
        while opened < MAX_CONNECTIONS:
            address = fresh_ip()
            for _ in range(min(CONNECTIONS_PER_CLIENT, MAX_CONNECTIONS - opened)):
                stack.enter_context(_greeted(hostile_relay, address))
                opened += 1
        with SmtpProbe(hostile_relay.smtp_port, fresh_ip()) as refused:
            assert refused.reply().startswith("421 4.3.2")
    # The relay is shared by the module's tests: give the slots back before the next.
    wait_until(lambda: _greeting(hostile_relay, fresh_ip()) == 220, 10, "the slots to free up")


def _submission(relay: HostileRelay, ip: str) -> SmtpProbe:
    """A session on the submission port from ip, in TLS and ready for AUTH."""
    smtp = _greeted(relay, ip, relay.submission_port)
    smtp.command("EHLO probe.test")
    smtp.starttls()
    smtp.command("EHLO probe.test")
    return smtp


def _mails_until_refused(smtp: SmtpProbe, sender: str, most: int) -> tuple[int, str | None]:
    """MAIL (then RSET) until one is refused or most were accepted: (accepted, the refusal)."""
    for accepted in range(most):
        reply = smtp.command(f"MAIL FROM:<{sender}>")
        if reply.code != 250:
            return accepted, reply.lines[-1]
        smtp.command("RSET")
    return most, None


def _refills(started: float, per_minute: int) -> float:
    """The tokens a bucket can have regained since started.

    The rate checks count what a bucket let through against its size plus
    this, so a slow run (a loaded machine) widens the bound instead of failing.
    """
    return (time.monotonic() - started) * per_minute / 60


def test_trusted_networks_are_exempt_from_per_client_limits(hostile_relay: HostileRelay) -> None:
    # Like Postfix's smtpd_client_event_limit_exceptions = $mynetworks: a trusted
    # client may relay anywhere already; its connection pool is not an attack.
    # test_connections_per_client_and_in_total and test_message_rate_per_client
    # show the same limits still hold for everyone else.
    wanted = MESSAGES_PER_CLIENT_MINUTE + 5
    with ExitStack() as stack:
        sessions = [
            stack.enter_context(_greeted(hostile_relay, TRUSTED_IP))
            for _ in range(CONNECTIONS_PER_CLIENT + 2)
        ]
        sessions[-1].command("EHLO probe.test")
        accepted, refusal = _mails_until_refused(sessions[-1], "a@trusted.test", wanted)
    assert (accepted, refusal) == (wanted, None)
    wait_until(lambda: _greeting(hostile_relay, fresh_ip()) == 220, 10, "the slots to free up")


def test_message_rate_per_client(hostile_relay: HostileRelay) -> None:
    with _greeted(hostile_relay, fresh_ip()) as smtp:
        smtp.command("EHLO probe.test")
        started = time.monotonic()
        accepted, refusal = _mails_until_refused(
            smtp, "a@client.test", 3 * MESSAGES_PER_CLIENT_MINUTE
        )
        refilled = _refills(started, MESSAGES_PER_CLIENT_MINUTE)
    assert refusal is not None and refusal.startswith("450 4.7.1"), (accepted, refusal)
    assert MESSAGES_PER_CLIENT_MINUTE <= accepted <= MESSAGES_PER_CLIENT_MINUTE + refilled


def test_message_rate_per_identity_across_addresses(hostile_relay: HostileRelay) -> None:
    # The same login from several addresses (pods behind SNAT, new pod IPs) shares
    # one bucket: two addresses spend half of it each, and the third is refused.
    half = MESSAGES_PER_IDENTITY_MINUTE // 2
    accepted, refusal = 0, None
    started = time.monotonic()
    for most in (half, half, 2 * MESSAGES_PER_IDENTITY_MINUTE):
        assert refusal is None, f"refused after {accepted}, before the third address: {refusal}"
        with _submission(hostile_relay, fresh_ip()) as smtp:
            assert smtp.command(plain("carol", PASSWORDS["carol"])).code == 235
            sent, refusal = _mails_until_refused(smtp, "carol@carol.test", most)
            accepted += sent
    refilled = _refills(started, MESSAGES_PER_IDENTITY_MINUTE)
    assert refusal is not None and refusal.startswith("450 4.7.1"), (accepted, refusal)
    assert MESSAGES_PER_IDENTITY_MINUTE <= accepted <= MESSAGES_PER_IDENTITY_MINUTE + refilled


def test_failed_auth_locks_the_address_out(hostile_relay: HostileRelay) -> None:
    ip = fresh_ip()
    failures = 0
    started = time.monotonic()
    # The right password after every wrong one, until even it is refused: the
    # address is locked out, and told so.
    while failures <= 3 * AUTH_FAILURES_PER_MINUTE:
        with _submission(hostile_relay, ip) as smtp:
            reply = smtp.command(plain("alice", PASSWORDS["alice"]))
            if reply.code != 235:
                assert reply.startswith("421 4.7.0"), reply.text
                assert smtp.closed_by_server()
                break
        with _submission(hostile_relay, ip) as smtp:
            assert smtp.command(plain("alice", f"guess-{failures}")).startswith("535 5.7.8")
            failures += 1
    refilled = _refills(started, AUTH_FAILURES_PER_MINUTE)
    assert AUTH_FAILURES_PER_MINUTE <= failures <= AUTH_FAILURES_PER_MINUTE + refilled
    with _submission(hostile_relay, fresh_ip()) as smtp:
        assert smtp.command(plain("alice", PASSWORDS["alice"])).code == 235


SMUGGLED = b"MAIL FROM:<ceo@alice.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSmuggled\r\n"


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\n.\r"],
    ids=repr,
)
def test_smuggling_cannot_end_data_early(hostile_relay: HostileRelay, fake_end: bytes) -> None:
    """SMTP smuggling (Dec 2023): only <CRLF>.<CRLF> ends DATA, and what is stored is clean."""
    marker = uuid.uuid4().hex
    with _greeted(hostile_relay, fresh_ip()) as smtp:
        smtp.command("EHLO probe.test")
        smtp.command("MAIL FROM:<someone@client.test>")
        smtp.command("RCPT TO:<user@example.com>")
        assert smtp.command("DATA").code == 354
        smtp.send(f"Subject: {marker}\r\n\r\nfirst".encode() + fake_end + SMUGGLED + b"\r\n.\r\n")
        assert smtp.reply().startswith("250 2.0.0"), "one message, one reply"
        assert smtp.command("NOOP").lines == ("250 OK",), "no reply to a smuggled command"

    def arrived() -> bool:
        return any(marker.encode() in m.content for m in hostile_relay.sink.messages)

    wait_until(arrived, 60, "the message at the sink")
    [message] = [m for m in hostile_relay.sink.messages if marker.encode() in m.content]
    assert b"Smuggled" in message.content
    body = message.content.split(b"\r\n\r\n", 1)[1]
    # Stored with CRLF only: no next hop can read a different end of data into it.
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")
    assert not [m for m in hostile_relay.sink.messages if m.content.startswith(b"Smuggled")]


def _delivered(relay: HostileRelay, marker: str) -> list[Received]:
    def arrived() -> bool:
        return any(marker.encode() in m.content for m in relay.sink.messages)

    wait_until(arrived, 60, "the message at the sink")
    return [m for m in relay.sink.messages if marker.encode() in m.content]


def _send(
    relay: HostileRelay,
    recipients: list[str],
    body: bytes,
    mail: str = "MAIL FROM:<someone@client.test>",
    source: str | None = None,
) -> str:
    """The queue id of the message sent."""
    with _greeted(relay, source or fresh_ip()) as smtp:
        smtp.command("EHLO probe.test")
        assert smtp.command(mail).startswith("250 2.1.0")
        for recipient in recipients:
            reply = smtp.command(f"RCPT TO:<{recipient}>")
            assert reply.startswith("250 2.1.5"), (recipient, reply.text)
        assert smtp.command("DATA").code == 354
        smtp.send(body + b"\r\n.\r\n")
        reply = smtp.reply()
        assert reply.startswith("250 2.0.0 Ok: queued as ")
        return reply.lines[-1].rsplit(" ", 1)[1]


def test_duplicate_recipients_get_one_copy(hostile_relay: HostileRelay) -> None:
    """Domains compare case-insensitively, local parts exactly (RFC 5321 2.4)."""
    marker = uuid.uuid4().hex
    given = ["user@example.com"] * 3 + ["user@EXAMPLE.Com", "User@Example.Com"]
    queue_id = _send(hostile_relay, given, f"Subject: {marker}\r\n\r\nonce".encode())
    # Its record goes once every delivery of it is done: every copy has arrived by then.
    wait_until(
        lambda: queue_id not in {r.queue_id for r in message_records(hostile_relay.relay.nats_url)},
        60,
        "the message to be delivered completely",
    )
    messages = _delivered(hostile_relay, marker)
    recipients = sorted(r for m in messages for r in m.recipients)
    assert recipients == ["User@example.com", "user@example.com"], messages


def test_every_spelling_of_a_domain_is_that_domain_and_goes_out_as_such(
    hostile_relay: HostileRelay,
) -> None:
    """UTS 46 maps each of these to example.com (core/domains.py): the inbound domain,
    one recipient, and the envelope that goes out says example.com."""
    marker = uuid.uuid4().hex
    spellings = [
        "user@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.com",  # full-width letters
        "user@example\u3002com",  # ideographic full stop
        "user@exam\u200bple.com",  # a zero-width space
        "user@EXAMPLE.com",
    ]
    mail = "MAIL FROM:<someone@\uff43lient.test> SMTPUTF8"
    _send(hostile_relay, spellings, f"Subject: {marker}\r\n\r\nonce".encode(), mail)
    [message] = _delivered(hostile_relay, marker)
    assert message.recipients == ("user@example.com",)
    assert message.mail_from == "someone@client.test"


def test_a_name_idna_2003_folded_goes_out_as_its_own_a_label(hostile_relay: HostileRelay) -> None:
    """IDNA 2003 made claß.test class.test, another domain; IDNA 2008 keeps the ß."""
    marker = uuid.uuid4().hex
    mail = "MAIL FROM:<someone@client.test> SMTPUTF8"
    body = f"Subject: {marker}\r\n\r\nhello".encode()
    _send(hostile_relay, ["u@cla\u00df.test"], body, mail, source=TRUSTED_IP)
    [message] = _delivered(hostile_relay, marker)
    assert message.recipients == ("u@xn--cla-7ka.test",)


def test_postmaster_without_a_domain_is_the_relays_postmaster(hostile_relay: HostileRelay) -> None:
    marker = uuid.uuid4().hex
    _send(hostile_relay, ["postmaster"], f"Subject: {marker}\r\n\r\nhello".encode())
    [message] = _delivered(hostile_relay, marker)
    assert message.recipients == ("postmaster@relay.test",)


def test_the_longest_lines_as_sent_reach_the_next_hop(hostile_relay: HostileRelay) -> None:
    """Lines ingress took are lines the next hop takes: no refusal, so no bounce."""
    marker = uuid.uuid4().hex
    stored = [b"y" * 998, b".", b"." + b"x" * 996, b"z" * 998]
    # On the wire: a bare LF before the dotted line (so it is not unstuffed), and
    # a transparency dot before the last.
    body = b"\r\n".join([f"Subject: {marker}\r\n".encode(), b"y" * 998 + b"\n.\n." + b"x" * 996])
    _send(hostile_relay, ["user@example.com"], body + b"\r\n." + b"z" * 998)
    [message] = _delivered(hostile_relay, marker)
    assert message.content.endswith(b"\r\n\r\n" + b"\r\n".join(stored) + b"\r\n")
