"""Debian's Postfix as the next hop, offering neither 8BITMIME nor SMTPUTF8 (RFC 6152, RFC 6531).

Postfix runs with `smtputf8_enable = no` and 8BITMIME discarded from its EHLO
reply, judging what it is sent with `strict_8bitmime` (8-bit text without
MIME encoding information, 8-bit header fields) and
`strict_mime_encoding_domain` (an encoding a multipart or message part may
not have), and relays what it accepts to a sink, where the content is
checked. dkimpy verifies with a dnsfunc answering the computed record: the
public DNS is out of reach here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import dkim
import pytest
from kurrier.core.dkim_keys import dkim_txt_record
from kurrier.delivery.courier import Courier

from bench.systems import Postfix
from tests.delivery.attempts import job, table
from tests.delivery.test_mime_downgrade import DKIM_KEY, mixed_message, payloads
from tests.support.postfix import private_postfix
from tests.support.relay import route, secret, signing_domain
from tests.support.sink import Sink

OLDER_NEXT_HOP = {
    "smtputf8_enable": "no",
    "smtpd_discard_ehlo_keywords": "8bitmime",
    "strict_8bitmime": "yes",
    "strict_mime_encoding_domain": "yes",
}


@pytest.fixture
async def postfix() -> AsyncIterator[tuple[Postfix, Sink]]:
    with Sink() as sink:
        async with private_postfix(sink.port, OLDER_NEXT_HOP) as server:
            yield server, sink


async def test_postfix_takes_the_7bit_form_and_relays_it_intact(
    courier: Courier, postfix: tuple[Postfix, Sink]
) -> None:
    server, sink = postfix
    routes = table(
        secret("dkim", **{"private.pem": DKIM_KEY}),
        signing_domain("sender.test", "ed1", "dkim"),
        route("postfix", ["*"], server.smtp_port),
    )
    [outcome] = await courier.deliver(job(["r@dest.test"]), mixed_message(), routes)
    assert outcome.outcome == "delivered", outcome.reply
    [relayed] = await asyncio.to_thread(sink.wait_for, 1)
    assert relayed.content.isascii()
    assert payloads(relayed.content) == payloads(mixed_message())
    name, value = dkim_txt_record(DKIM_KEY, "ed1", "sender.test")

    def dnsfunc(asked: bytes, timeout: int = 5) -> bytes | None:
        return value.encode() if asked.decode().rstrip(".") == name else None

    assert dkim.verify(relayed.content, dnsfunc=dnsfunc)


async def test_postfix_without_smtputf8_is_never_sent_a_message_that_needs_it(
    courier: Courier, postfix: tuple[Postfix, Sink]
) -> None:
    server, sink = postfix
    routes = table(route("postfix", ["*"], server.smtp_port))
    utf8_subject = "Subject: Grüße\r\nMIME-Version: 1.0\r\n\r\nbody\r\n".encode()
    [refused] = await courier.deliver(job(["r@dest.test"]), utf8_subject, routes)
    assert refused.outcome == "bounced"
    assert refused.reply.startswith(f"550 5.6.7 127.0.0.1:{server.smtp_port} does not offer")
    # The same session still carries mail that does not need the extension.
    [sent] = await courier.deliver(job(["r@dest.test"]), b"Subject: plain\r\n\r\nok\r\n", routes)
    assert sent.outcome == "delivered", sent.reply
    [relayed] = await asyncio.to_thread(sink.wait_for, 1)
    assert b"Subject: plain" in relayed.content
