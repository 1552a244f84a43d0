"""8-bit MIME made 7-bit for a next hop without 8BITMIME (RFC 6152 3, RFC 2045 6).

Works on the message's bytes rather than through the email package's
generator, so nothing changes but the 8-bit parts: header fields keep their
order and folding, boundaries and 7-bit parts stay byte for byte. A text part
whose lines all end in CRLF becomes quoted-printable (still readable as
text); any other 8-bit part becomes base64. A multipart is converted part by
part, a message/rfc822 part as the message inside it (RFC 2046 5.2.1 allows
it no encoding of its own), a message/global part as a whole (RFC 6532 3.5
allows base64).

Some 8-bit messages have no 7-bit form, and `Unconvertible` says why: 8-bit
octets in a header field (no MIME encoding applies to a header section as
sent), in a part declared base64 or quoted-printable (the declaration is
false), in a multipart's preamble or epilogue, or in a message without
MIME-Version (nothing says what its octets are).
"""

from __future__ import annotations

import base64
import binascii
import re
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

CRLF = b"\r\n"
_HEADER_PARSER = BytesHeaderParser(policy=compat32)
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


class Unconvertible(ValueError):
    """The message has 8-bit octets where no 7-bit MIME encoding can reach them."""


def to_seven_bit(message: bytes) -> bytes:
    """message with each 8-bit MIME part re-encoded; a 7-bit message comes back as it is."""
    if message.isascii():
        return message
    header, _, _ = _split(message)
    if header.isascii() and _fields(header).get("mime-version") is None:
        raise Unconvertible("8-bit body in a message that is not MIME (no MIME-Version)")
    return _entity(message, "text/plain")


def _split(entity: bytes) -> tuple[bytes, bytes, bytes]:
    """(header section with each field's CRLF, the blank line, body)."""
    if entity.startswith(CRLF):
        return b"", CRLF, entity[2:]
    head, blank, body = entity.partition(CRLF + CRLF)
    return (head + CRLF, CRLF, body) if blank else (entity, b"", b"")


def _fields(header: bytes) -> Message:
    return _HEADER_PARSER.parsebytes(header + CRLF)


def _transfer_encoding(fields: Message) -> str:
    value = str(fields.get("content-transfer-encoding", "7bit"))
    return value.split("(", 1)[0].strip().lower() or "7bit"


def _entity(entity: bytes, default_type: str) -> bytes:
    header, blank, body = _split(entity)
    if not header.isascii():
        raise Unconvertible("8-bit octets in a header field")
    if body.isascii():
        return entity
    fields = _fields(header)
    fields.set_default_type(default_type)
    content_type = fields.get_content_type()
    encoding = _transfer_encoding(fields)
    if encoding in ("base64", "quoted-printable"):
        raise Unconvertible(f"8-bit octets in a part declared {encoding}")
    if content_type.startswith("multipart/"):
        boundary = fields.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise Unconvertible(f"{content_type} without a boundary")
        inner = "message/rfc822" if content_type == "multipart/digest" else "text/plain"
        converted = _multipart(body, boundary.encode("ascii"), inner)
        return _labelled(header, "7bit", fields) + blank + converted
    if content_type == "message/rfc822":
        return _labelled(header, "7bit", fields) + blank + _entity(body, "text/plain")
    if content_type.startswith("text/") and encoding != "binary" and _lines_end_in_crlf(body):
        return _labelled(header, "quoted-printable", fields) + blank + _quoted_printable(body)
    return _labelled(header, "base64", fields) + blank + _base64(body)


def _multipart(body: bytes, boundary: bytes, part_type: str) -> bytes:
    """The body with each part converted; delimiter lines, preamble and epilogue as they were."""
    delimiter = re.compile(rb"(?:^|\r\n)--" + re.escape(boundary) + rb"(--)?[ \t]*(?=\r\n|$)")
    matches = []
    for match in delimiter.finditer(body):
        matches.append(match)
        if match.group(1):  # the close delimiter: what follows is the epilogue
            break
    if not matches:
        raise Unconvertible("8-bit octets in a multipart without its boundary")
    preamble = body[: matches[0].start()]
    out = [preamble]
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(body)
        out.append(body[match.start() : match.end()])
        rest = body[match.end() : end]
        if match.group(1):
            out.append(rest)  # the epilogue
            if not (preamble + rest).isascii():
                raise Unconvertible("8-bit octets in a multipart's preamble or epilogue")
        elif rest.startswith(CRLF):
            out.append(CRLF + _entity(rest[2:], part_type))
        else:
            out.append(rest)  # a delimiter at the very end: no part follows
    if not preamble.isascii():
        raise Unconvertible("8-bit octets in a multipart's preamble or epilogue")
    return b"".join(out)


def _labelled(header: bytes, encoding: str, fields: Message) -> bytes:
    """The header section declaring encoding: the first Content-Transfer-Encoding field
    rewritten in place, any others dropped; one added at the end if there was none."""
    if encoding == "7bit" and _transfer_encoding(fields) == "7bit":
        return header
    label = b"Content-Transfer-Encoding: " + encoding.encode() + CRLF
    lines = header.split(CRLF)[:-1]
    out: list[bytes] = []
    dropping = labelled = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line + CRLF)
            continue
        name = _FIELD_NAME.match(line)
        dropping = name is not None and name.group(1).lower() == b"content-transfer-encoding"
        if not dropping:
            out.append(line + CRLF)
        elif not labelled:
            out.append(label)
            labelled = True
    if not labelled:
        out.append(label)
    return b"".join(out)


def _lines_end_in_crlf(body: bytes) -> bool:
    pairs = body.count(CRLF)
    return body.count(b"\r") == pairs and body.count(b"\n") == pairs


def _quoted_printable(body: bytes) -> bytes:
    # binascii keeps the CRLF line breaks (it follows the first one it sees),
    # breaks lines over 76 characters softly and encodes trailing white space.
    return binascii.b2a_qp(body, quotetabs=False, istext=True, header=False)


def _base64(body: bytes) -> bytes:
    return base64.encodebytes(body).replace(b"\n", CRLF)
