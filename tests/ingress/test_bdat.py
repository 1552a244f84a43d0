"""BDAT (RFC 3030 CHUNKING) on a raw socket: the same message, limits and defences as DATA.

smtplib has no BDAT, so every byte here is written by hand. The sink behind
the relay does not offer CHUNKING: what arrives came through delivery's DATA,
dot-stuffed, so a chunk holding "<CRLF>.<CRLF>" shows that stuffing is right.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from kurrier.delivery.smtp_client import TransactionResult

from tests.ingress.conftest import MAX_HEADERS, MAX_MESSAGE_SIZE, HostileRelay, fresh_ip
from tests.ingress.smtp_probe import SmtpProbe
from tests.support.processes import wait_until
from tests.support.sink import Received
from tests.support.smtp_client import plain_session

ENVELOPE = b"MAIL FROM:<someone@client.test>\r\nRCPT TO:<user@example.com>\r\n"
SMUGGLED = b"MAIL FROM:<ceo@alice.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSmuggled\r\n"
# Lines of 100 octets, a little over half the size limit.
HALF_PLUS = (b"x" * 98 + b"\r\n") * (MAX_MESSAGE_SIZE // 200 + 1)


def _bdat(chunk: bytes, last: bool = False) -> bytes:
    return f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk


def _session(relay: HostileRelay) -> SmtpProbe:
    smtp = SmtpProbe(relay.smtp_port, fresh_ip())
    assert smtp.reply().code == 220
    assert "CHUNKING" in [line[4:] for line in smtp.command("EHLO probe.test").lines]
    return smtp


def _delivered(relay: HostileRelay, marker: str) -> Received:
    def arrived() -> bool:
        return any(marker.encode() in m.content for m in relay.sink.messages)

    wait_until(arrived, 60, "the message at the sink")
    [message] = [m for m in relay.sink.messages if marker.encode() in m.content]
    return message


def _sent(smtp: SmtpProbe, octets: bytes) -> str:
    """The last line of the reply to octets (a BDAT with its chunk, no CRLF added)."""
    smtp.send(octets)
    return smtp.reply().lines[-1]


def _replies(smtp: SmtpProbe, count: int) -> list[str]:
    return [smtp.reply().lines[-1] for _ in range(count)]


def test_pipelined_chunks_arrive_intact_and_in_order(hostile_relay: HostileRelay) -> None:
    """MAIL, RCPT and every chunk in one write; one reply each, in order; the message
    at the next hop is the chunks' octets, line endings made CRLF, nothing ended early."""
    marker = uuid.uuid4().hex
    chunks = [
        f"Subject: {marker}\r\n\r\n.leading dot\r\nfake end\r\n.\r\n".encode() + SMUGGLED,
        b"..two dots\r\nsplit CR\r",  # the CRLF straddles two chunks
        b"\nbare\nLF\r\nno final CRLF",
    ]
    with _session(hostile_relay) as smtp:
        smtp.send(
            ENVELOPE + _bdat(chunks[0]) + _bdat(chunks[1]) + _bdat(chunks[2]) + b"BDAT 0 LAST\r\n"
        )
        replies = _replies(smtp, 6)
        assert replies[:2] == ["250 2.1.0 Ok", "250 2.1.5 Ok"]
        assert replies[2:5] == [f"250 2.0.0 {len(chunk)} octets received" for chunk in chunks]
        assert replies[5].startswith("250 2.0.0 Ok: queued as ")
        assert smtp.command("NOOP").lines == ("250 OK",), "no reply to a smuggled command"
    message = _delivered(hostile_relay, marker)
    assert not message.chunked, "the sink offers no CHUNKING: delivery used DATA"
    assert message.recipients == ("user@example.com",)
    body = b"".join(chunks).replace(b"bare\nLF", b"bare\r\nLF") + b"\r\n"
    header, _, received = message.content.partition(f"Subject: {marker}".encode())
    assert header.startswith(b"Received: from probe.test"), header
    assert f"Subject: {marker}".encode() + received == body
    assert not [m for m in hostile_relay.sink.messages if "victim@example.com" in m.recipients]


@pytest.mark.parametrize(("dots", "reply"), [(996, "250 2.0.0"), (997, "552 5.6.0")])
def test_a_last_line_without_its_crlf_is_measured_as_sent(
    hostile_relay: HostileRelay, dots: int, reply: str
) -> None:
    """It goes out with a CRLF and, starting with ".", a transparency dot: 1000 octets at most."""
    with _session(hostile_relay) as smtp:
        smtp.send(ENVELOPE + _bdat(b"Subject: s\r\n\r\n." + b"x" * dots, last=True))
        assert _replies(smtp, 3)[-1].startswith(reply)


@pytest.mark.parametrize(
    ("chunks", "refusal"),
    [
        ([b"Subject: s\r\n\r\n" + HALF_PLUS, HALF_PLUS], "552 5.3.4"),
        ([b"Subject: s\r\n\r\n" + b"x" * 600, b"x" * 600 + b"\r\n"], "552 5.6.0"),  # one line
        ([b"Subject: s\r\n\r\n" + b"." + b"x" * 997 + b"\r\n"], "552 5.6.0"),  # 1001 as sent
        ([b"".join(b"X-%d: h\r\n" % n for n in range(MAX_HEADERS + 1))], "552 5.6.0"),
        ([b"Received: from a\r\n" * 51], "554 5.4.6"),
    ],
    ids=["size", "line-across-chunks", "dot-stuffed-line", "headers", "hops"],
)
def test_a_chunk_past_a_limit_ends_the_transaction_in_step(
    hostile_relay: HostileRelay, chunks: list[bytes], refusal: str
) -> None:
    """The chunk that crosses a limit is refused and read to its end; pipelined chunks
    after it are read too and get 503, so nothing in them runs as a command."""
    assert sum(map(len, chunks)) <= 2 * MAX_MESSAGE_SIZE
    tail = b"VRFY x\r\n"
    with _session(hostile_relay) as smtp:
        smtp.send(ENVELOPE + b"".join(map(_bdat, chunks)) + _bdat(tail, last=True))
        replies = _replies(smtp, 2 + len(chunks) + 1)
        assert replies[-2].startswith(refusal), replies
        assert replies[-1] == "503 5.5.1 Error: need MAIL command"
        assert smtp.command("NOOP").lines == ("250 OK",)


def test_refused_bdat_still_reads_its_octets(hostile_relay: HostileRelay) -> None:
    chunk = b"VRFY x\r\n"  # run as a command, it would get a reply of its own
    with _session(hostile_relay) as smtp:
        assert _sent(smtp, _bdat(chunk)) == "503 5.5.1 Error: need MAIL command"
        smtp.command("MAIL FROM:<someone@client.test>")
        assert _sent(smtp, _bdat(chunk)) == "503 5.5.1 Error: need RCPT command"
        assert smtp.command("RCPT TO:<user@example.com>").startswith("250")
        assert _sent(smtp, _bdat(chunk)).startswith("250 2.0.0 8 octets received")
        assert smtp.command("DATA").startswith("503 5.5.1 Error: DATA after BDAT")
        assert smtp.command("RCPT TO:<user2@example.com>").startswith("503 5.5.1")
        assert smtp.command("NOOP").lines == ("250 OK",)
    with SmtpProbe(hostile_relay.smtp_port, fresh_ip()) as smtp:
        smtp.reply()
        smtp.command("HELO probe.test")
        assert _sent(smtp, _bdat(chunk)).startswith("503 5.5.1 Error: send EHLO first")
        assert smtp.command("NOOP").lines == ("250 OK",)


@pytest.mark.parametrize("argument", ["", " 12x", " -1", " 5 LATER", " 5 LAST x", " 1e3"])
def test_a_size_that_cannot_be_read_closes_the_connection(
    hostile_relay: HostileRelay, argument: str
) -> None:
    """Without a size the chunk's end is unknown: its octets must not run as commands."""
    with _session(hostile_relay) as smtp:
        smtp.send(ENVELOPE)
        _replies(smtp, 2)
        assert smtp.command(f"BDAT{argument}").lines[-1] == "501 5.5.4 Syntax: BDAT <size> [LAST]"
        assert smtp.reply().startswith("421 4.5.0"), "at once, not at the idle timeout"
        assert smtp.closed_by_server()


def test_rset_and_a_lost_connection_discard_the_chunks(hostile_relay: HostileRelay) -> None:
    discarded, lost, kept = (uuid.uuid4().hex for _ in range(3))
    with _session(hostile_relay) as smtp:
        smtp.send(ENVELOPE + _bdat(f"Subject: {discarded}\r\n".encode()) + b"RSET\r\n")
        assert _replies(smtp, 4)[-1] == "250 OK"
    with _session(hostile_relay) as smtp:
        smtp.send(ENVELOPE + b"BDAT 100 LAST\r\n" + f"Subject: {lost}\r\n".encode())
        _replies(smtp, 2)
    with _session(hostile_relay) as smtp:
        smtp.send(ENVELOPE + _bdat(f"Subject: {kept}\r\n\r\nbody\r\n".encode(), last=True))
        assert _replies(smtp, 3)[-1].startswith("250 2.0.0 Ok: queued as")
    _delivered(hostile_relay, kept)
    # Either of the others, had it been accepted, was accepted before this one.
    contents = b"".join(m.content for m in hostile_relay.sink.messages)
    assert discarded.encode() not in contents
    assert lost.encode() not in contents


async def _sent_by_kurriers_client(port: int, *transactions: tuple[str, bytes]) -> list[str]:
    """Each (recipient, body) as delivery sends it to a hop offering CHUNKING: MAIL, RCPT
    and one BDAT LAST in a write. The final reply of each transaction."""
    session = await plain_session(port, server_name="relay.test", helo_name="client.test")
    try:
        assert "CHUNKING" in session.extensions
        results: list[TransactionResult] = [
            await session.send("someone@client.test", [rcpt], body) for rcpt, body in transactions
        ]
    finally:
        await session.quit()
    return [
        str(r.data or r.reply_for(rcpt)) for r, (rcpt, _) in zip(results, transactions, strict=True)
    ]


def test_kurriers_own_delivery_client_sends_to_ingress_by_bdat(hostile_relay: HostileRelay) -> None:
    """Relay to relay: the BDAT delivery sends, refused recipient and all, is one ingress takes."""
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    replies = asyncio.run(
        _sent_by_kurriers_client(
            hostile_relay.smtp_port,
            ("user@example.com", f"Subject: {first}\r\n\r\n.\r\n..\r\n".encode()),
            ("victim@elsewhere.test", b"Subject: refused\r\n\r\nnot relayed\r\n"),
            ("user@example.com", f"Subject: {second}\r\n\r\nno CRLF".encode()),
        )
    )
    assert replies[0].startswith("250 2.0.0 Ok: queued as")
    assert replies[1].startswith("554 5.7.1")
    assert replies[2].startswith("250 2.0.0 Ok: queued as")
    assert _delivered(hostile_relay, first).content.endswith(b"\r\n\r\n.\r\n..\r\n")
    assert _delivered(hostile_relay, second).content.endswith(b"\r\n\r\nno CRLF\r\n")
