"""Reading SMTP text: a message's header section, and the codes of an SMTP reply (pure).

Every service that looks at a message's header fields, or at the codes of a
reply (its own or a next hop's), reads them here, so there is one rule each.
"""

from __future__ import annotations

import re

# How far into a message its header fields are looked for (Message-ID,
# Traceparent, the headers an administrator is shown): the header section
# of real mail is far smaller, and a message without a blank line is not
# scanned whole.
HEADER_SCAN_LIMIT = 64 * 1024

# RFC 3463: class.subject.detail after the basic code and its separator
# (RFC 2034: a space, or a hyphen on all but the last line). Replies seen in
# the wild are read leniently: more white space before the status code, and
# punctuation after it ("5.1.1: user unknown"); not a longer code ("5.1.1.2").
_ENHANCED_STATUS = re.compile(r"\d{3}[ -][ \t]*([245]\.\d{1,3}\.\d{1,3})(?!\w|\.\d)", re.ASCII)


def header_section(message: bytes, scan_limit: int | None = HEADER_SCAN_LIMIT) -> bytes:
    """The header fields of message, each with its CRLF, up to the blank line that ends them.

    Only the first scan_limit bytes are looked at (None: all of them); with no
    blank line among them, all of those bytes are returned.
    """
    head = message if scan_limit is None else message[:scan_limit]
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[: end + 2]


def reply_code(reply: str) -> int:
    """The basic code (RFC 5321 4.2) an SMTP reply starts with; 0 if it starts with none."""
    code = reply[:3]
    return int(code) if len(code) == 3 and code.isascii() and code.isdigit() else 0


def enhanced_status(reply: str) -> str:
    """The enhanced status code (RFC 3463) after a reply's basic code, e.g. '5.1.1'; '' if none."""
    match = _ENHANCED_STATUS.match(reply)
    return match.group(1) if match else ""
