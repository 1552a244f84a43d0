"""What one next hop may be sent of an attempt's message, given the extensions it offers.

A message that needs SMTPUTF8 (RFC 6531: a non-ASCII address, or UTF-8 in
its header fields) goes only to a hop offering SMTPUTF8; elsewhere it is
refused with 5.6.7 (RFC 6531 3.4). An 8-bit message goes as it is to a hop
offering 8BITMIME, and converted to 7-bit MIME to one that does not (RFC 6152
3); if it has no 7-bit form it is refused with 5.6.3 (RFC 3463). Each form is
DKIM-signed as it will be sent, after any conversion (a signature over the
8-bit body would not verify over its re-encoding), and only when a hop
first needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from kurrier.core.smtp_text import header_section
from kurrier.delivery.mime_downgrade import Unconvertible, to_seven_bit
from kurrier.delivery.smtp_client import Reply


@dataclass(frozen=True)
class Transmission:
    """The bytes a hop gets, and the MAIL parameters that describe them."""

    body: bytes
    smtputf8: bool
    body_type: str  # "8BITMIME" or "" (7-bit)


def _utf8_header_fields(message: bytes) -> bool:
    header = header_section(message, scan_limit=None)
    if header.isascii():
        return False
    try:
        header.decode("utf-8")
    except UnicodeDecodeError:
        return False  # 8-bit but not UTF-8: no extension makes it valid
    return True


class MessageForms:
    def __init__(self, body: bytes, *, declared_smtputf8: bool, sign: Callable[[bytes], bytes]):
        self._body = body
        self._declared_smtputf8 = declared_smtputf8
        self._utf8_header = _utf8_header_fields(body)
        self._sign = sign
        self._as_is: bytes | None = None
        self._seven_bit: bytes | Unconvertible | None = None

    def for_hop(
        self, extensions: Collection[str], mail_from: str, recipients: list[str], hop: str
    ) -> Transmission | Reply:
        """The form for a hop offering extensions (EHLO keywords, upper case), or the refusal."""
        needs_smtputf8 = (
            self._utf8_header
            or not mail_from.isascii()
            or not all(recipient.isascii() for recipient in recipients)
        )
        if needs_smtputf8 and "SMTPUTF8" not in extensions:
            return Reply(
                550, f"5.6.7 {hop} does not offer SMTPUTF8, which the message needs (RFC 6531)"
            )
        smtputf8 = needs_smtputf8 or self._declared_smtputf8
        if "8BITMIME" in extensions or self._body.isascii():
            if self._as_is is None:
                self._as_is = self._sign(self._body)
            body_type = "" if self._as_is.isascii() else "8BITMIME"
            return Transmission(self._as_is, smtputf8, body_type)
        if self._seven_bit is None:
            try:
                self._seven_bit = self._sign(to_seven_bit(self._body))
            except Unconvertible as error:
                self._seven_bit = error
        if isinstance(self._seven_bit, Unconvertible):
            return Reply(
                554,
                f"5.6.3 {hop} does not offer 8BITMIME, and the message has no 7-bit form: "
                f"{self._seven_bit}",
            )
        return Transmission(self._seven_bit, smtputf8, "")
