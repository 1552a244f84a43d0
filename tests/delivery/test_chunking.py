"""BDAT (RFC 3030) towards a next hop that offers CHUNKING and PIPELINING, DATA otherwise.

The next hop is the test sink (aiosmtpd, with BDAT added) on a real socket.
"""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from kurrier.delivery.smtp_client import TransactionResult

from tests.support.relay import UpRelay, documents, inbound_domain, route, trusting
from tests.support.sink import Received, Sink
from tests.support.smtp_client import plain_session

# Lines a DATA transfer must dot-stuff; BDAT carries them as they are.
BODY = b"Subject: dots\r\n\r\n.hidden\r\n..two\r\n.\r\nend\r\n"


async def _transactions(
    sink: Sink, *bodies: tuple[list[str], bytes]
) -> tuple[list[TransactionResult], dict[str, str]]:
    session = await plain_session(sink.port, sink.host)
    try:
        results = [await session.send("a@relay.test", rcpts, body) for rcpts, body in bodies]
        return results, session.extensions
    finally:
        await session.quit()


def _seen(message: Received) -> tuple[tuple[str, ...], bytes, bool]:
    return message.recipients, message.content, message.chunked


def test_bdat_carries_the_content_as_it_is_in_the_write_with_the_envelope() -> None:
    with Sink(chunking=True) as sink:
        results, extensions = asyncio.run(
            _transactions(sink, (["r@example.com"], BODY), (["s@example.com"], b"no CRLF"))
        )
        received = sink.wait_for(2)
    assert {"PIPELINING", "CHUNKING"} <= extensions.keys()
    first, second = results
    assert first.reply_for("r@example.com").code == second.reply_for("s@example.com").code == 250
    assert all(r.body_sent for r in results)
    assert [_seen(m) for m in received] == [
        (("r@example.com",), BODY, True),
        (("s@example.com",), b"no CRLF\r\n", True),
    ]
    # One session carried both.
    assert received[0].connection == received[1].connection


def test_a_bdat_no_recipient_took_leaves_the_session_in_step() -> None:
    with Sink(chunking=True) as sink:
        sink.behaviour.rejected["gone@example.com"] = "550 5.1.1 no such user"
        results, _ = asyncio.run(
            _transactions(sink, (["gone@example.com"], BODY), (["r@example.com"], BODY))
        )
        received = sink.wait_for(1)
    refused, delivered = results
    assert str(refused.reply_for("gone@example.com")) == "550 5.1.1 no such user"
    # Nothing was accepted, so the content did not count as seen: another host may try.
    assert refused.decided_before_content("gone@example.com")
    assert delivered.reply_for("r@example.com").code == 250
    assert [m.recipients for m in received] == [("r@example.com",)]


def test_without_chunking_the_content_goes_dot_stuffed_by_data() -> None:
    with Sink() as sink:
        results, extensions = asyncio.run(
            _transactions(sink, (["r@example.com"], BODY), (["s@example.com"], b"no CRLF"))
        )
        received = sink.wait_for(2)
    assert "CHUNKING" not in extensions
    first, second = results
    assert first.reply_for("r@example.com").code == second.reply_for("s@example.com").code == 250
    assert [_seen(m) for m in received] == [
        (("r@example.com",), BODY, False),
        (("s@example.com",), b"no CRLF\r\n", False),
    ]


def test_the_relay_delivers_by_bdat_byte_identical(tmp_path: Path) -> None:
    with Sink(chunking=True) as sink:
        config = documents(
            inbound_domain("example.com"), route("to-sink", ["example.com"], sink.port), trusting()
        )
        with UpRelay(tmp_path, config) as relay:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as client:
                client.sendmail("a@client.test", ["r@example.com"], BODY)
            [message] = sink.wait_for(1)
    assert message.chunked
    # The relay prepends its Received: header; the rest is the client's message.
    assert message.content.startswith(b"Received: ")
    assert message.content.endswith(BODY)
