"""8BITMIME and SMTPUTF8 at the next hop (RFC 6152, RFC 6531): converted, refused, or sent as is.

The next hop is a real SMTP sink that leaves the extensions out of its EHLO
reply, as an older server does. dkimpy verifies signatures with a dnsfunc
answering the computed record: the public DNS is out of reach here.
"""

from __future__ import annotations

import email
from email.message import Message
from email.policy import compat32

import dkim
import pytest
from kurrier.core.dkim_keys import dkim_txt_record
from kurrier.delivery.courier import Courier
from kurrier.delivery.mime_downgrade import Unconvertible, to_seven_bit

from tests.delivery.attempts import by_address, job, table
from tests.support.certs import ed25519_key, private_pem
from tests.support.relay import route, secret, signing_domain
from tests.support.sink import Sink

DKIM_KEY = private_pem(ed25519_key()).decode()
PHOTO = bytes(range(256)) * 3  # every octet, bare CR and LF included
TEXT = "Grüße aus Köln — 8 bit\r\n.a line with a dot\r\ntrailing space \r\n" + "ü" * 120 + "\r\n"


def mixed_message(text_encoding: str = "8bit") -> bytes:
    """A multipart/mixed message: 8-bit text, a 7-bit part, raw binary, a forwarded message."""
    forwarded = (
        b"From: b@sender.test\r\nSubject: inner\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + "Inner Käse\r\n".encode()
    )
    return (
        b"From: Someone <someone@sender.test>\r\nTo: r@dest.test\r\nSubject: mixed\r\n"
        b"Message-ID: <mixed@sender.test>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="=-b1"\r\n'
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        b"preamble\r\n"
        b"--=-b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: "
        + text_encoding.encode()
        + b"\r\n\r\n"
        + TEXT.encode()
        + b"\r\n--=-b1\r\nContent-Type: text/plain\r\n\r\nplain ascii part\r\n"
        b"\r\n--=-b1\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: binary\r\n\r\n" + PHOTO + b"\r\n--=-b1\r\n"
        b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + forwarded
        + b"\r\n--=-b1--\r\nepilogue\r\n"
    )


def _parts(message: bytes) -> list[Message]:
    parsed = email.message_from_bytes(message, policy=compat32)
    return [part for part in parsed.walk() if not part.is_multipart()]


def payloads(message: bytes) -> list[bytes]:
    """Each leaf part's decoded content (a forwarded message's parts included)."""
    payloads = [part.get_payload(decode=True) for part in _parts(message)]
    assert all(isinstance(payload, bytes) for payload in payloads)
    return payloads  # type: ignore[return-value]


def test_8bit_parts_are_reencoded_and_the_rest_stays_byte_for_byte() -> None:
    original = mixed_message()
    converted = to_seven_bit(original)
    assert converted.isascii()
    assert max(len(line) for line in converted.split(b"\r\n")) <= 76
    # Same content, part for part: the text quoted-printable, the binary base64.
    assert payloads(converted) == payloads(original)
    encodings = [str(p.get("content-transfer-encoding", "7bit")) for p in _parts(converted)]
    assert encodings == ["quoted-printable", "7bit", "base64", "quoted-printable"]
    parsed = email.message_from_bytes(converted, policy=compat32)
    assert parsed["content-transfer-encoding"] == "7bit"
    forwarded = [p for p in parsed.walk() if p.get_content_type() == "message/rfc822"]
    # message/rfc822 takes no encoding of its own (RFC 2046 5.2.1): 7bit once converted.
    assert [p["content-transfer-encoding"] for p in forwarded] == ["7bit"]
    # Header fields, delimiters, preamble, epilogue and the 7-bit part are untouched.
    assert converted.startswith(original.split(b"Content-Transfer-Encoding: 8bit")[0])
    for kept in (
        b"preamble\r\n--=-b1\r\n",
        b"\r\n--=-b1\r\nContent-Type: text/plain\r\n\r\nplain ascii part\r\n",
        b"\r\n--=-b1--\r\nepilogue\r\n",
    ):
        assert kept in converted
    assert to_seven_bit(converted) == converted


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"Subject: K\xc3\xa4se\r\nMIME-Version: 1.0\r\n\r\nbody\r\n", "header field"),
        (b"From: a@b.test\r\n\r\nK\xc3\xa4se\r\n", "not MIME"),
        (mixed_message("base64"), "declared base64"),
        (
            mixed_message().replace(
                b"application/octet-stream\r\n",
                b"application/octet-stream\r\n"
                b'Content-Disposition: attachment; filename="K\xc3\xa4se"\r\n',
            ),
            "header field",
        ),
        (mixed_message().replace(b"preamble", "Präambel".encode()), "preamble or epilogue"),
    ],
    ids=["8-bit header", "not MIME", "8-bit base64 part", "8-bit part header", "preamble"],
)
def test_what_has_no_7bit_form_is_refused_with_the_reason(message: bytes, reason: str) -> None:
    with pytest.raises(Unconvertible, match=reason):
        to_seven_bit(message)


async def test_a_hop_without_8bitmime_gets_7bit_mime_signed_after_conversion(
    courier: Courier,
) -> None:
    record = dkim_txt_record(DKIM_KEY, "ed1", "sender.test")
    with Sink(without=("8BITMIME",)) as old, Sink() as modern:
        routes = table(
            secret("dkim", **{"private.pem": DKIM_KEY}),
            signing_domain("sender.test", "ed1", "dkim"),
            route("old", ["old.test"], old.port),
            route("modern", ["modern.test"], modern.port),
        )
        outcomes = await courier.deliver(
            job(["r@old.test", "r@modern.test"]), mixed_message(), routes
        )
        assert {o.outcome for o in outcomes} == {"delivered"}
        [downgraded], [as_is] = old.messages, modern.messages
    assert downgraded.content.isascii()
    assert "BODY=8BITMIME" not in downgraded.mail_options
    assert payloads(downgraded.content) == payloads(mixed_message())
    # The hop offering 8BITMIME gets the 8-bit original, labelled so.
    assert as_is.content.endswith(mixed_message())
    assert "BODY=8BITMIME" in as_is.mail_options
    # Each copy is signed as it was sent, so both verify.
    lookup = {record[0]: record[1].encode()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return lookup.get(name.decode().rstrip("."))

    assert dkim.verify(downgraded.content, dnsfunc=dnsfunc)
    assert dkim.verify(as_is.content, dnsfunc=dnsfunc)


async def test_8bit_headers_without_8bitmime_bounce_with_5_6_3(courier: Courier) -> None:
    latin1_subject = b"Subject: K\xe4se\r\nMIME-Version: 1.0\r\n\r\nbody\r\n"
    with Sink(without=("8BITMIME",)) as old:
        routes = table(route("old", ["*"], old.port))
        [outcome] = await courier.deliver(job(["r@old.test"]), latin1_subject, routes)
        assert old.messages == []
    assert outcome.outcome == "bounced"
    assert outcome.reply.startswith(f"554 5.6.3 127.0.0.1:{old.port} does not offer 8BITMIME")
    assert "header field" in outcome.reply


async def test_smtputf8_messages_bounce_with_5_6_7_where_it_is_not_offered(
    courier: Courier,
) -> None:
    utf8_subject = "Subject: Grüße\r\nMIME-Version: 1.0\r\n\r\nbody\r\n".encode()
    ascii_message = b"Subject: plain\r\n\r\nbody\r\n"
    with Sink(without=("SMTPUTF8",)) as old, Sink() as modern:
        routes = table(
            route("old", ["old.test"], old.port, priority=200), route("new", ["*"], modern.port)
        )
        # UTF-8 in a header field, and a non-ASCII recipient: each needs SMTPUTF8.
        header = await courier.deliver(job(["r@old.test", "r@new.test"]), utf8_subject, routes)
        address = await courier.deliver(
            job(["jürgen@old.test", "jürgen@new.test"], sender="s@sender.test"),
            ascii_message,
            routes,
        )
        # Declared SMTPUTF8 but all ASCII: nothing needs the extension, so it goes.
        declared = job(["r@old.test"]).model_copy(update={"smtputf8": True})
        [ascii_only] = await courier.deliver(declared, ascii_message, routes)
        delivered = {m.recipients: m for m in modern.messages}
        assert [m.recipients for m in old.messages] == [("r@old.test",)]
    for outcomes, refused in ((header, "r@old.test"), (address, "jürgen@old.test")):
        result = by_address(outcomes)
        outcome, reply = result.pop(refused)
        assert outcome == "bounced"
        assert reply.startswith(f"550 5.6.7 127.0.0.1:{old.port} does not offer SMTPUTF8")
        assert [o for o, _ in result.values()] == ["delivered"]
    assert "SMTPUTF8" in delivered[("r@new.test",)].mail_options
    assert "SMTPUTF8" in delivered[("jürgen@new.test",)].mail_options
    assert ascii_only.outcome == "delivered"
