"""The reverse- and forward-path of MAIL and RCPT, parsed strictly (RFC 5321 4.1.2, RFC 6531).

aiosmtpd parses paths with the e-mail *header* parser, which accepts comments,
spaces around '@' and other RFC 5322 forms no SMTP client may send; this
parser takes exactly the SMTP grammar. A source route ("@a,@b:") is parsed
and ignored, as RFC 5321 4.1.1.3 and C.1 say: the mail goes to the mailbox,
never through the listed hosts. Non-ASCII is the UTF-8 of RFC 6531 without
control characters or line separators, so a path can never break a header.
"""

from __future__ import annotations

import re

# RFC 6532 UTF8-non-ascii, less C1 controls (U+0080-U+009F), the line and paragraph
# separators (U+2028/2029) and lone surrogates (undecodable octets, surrogateescape'd).
_UTF8 = "\u00a0-\u2027\u202a-\ud7ff\ue000-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_UTF8}]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED_STRING = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'
_LET_DIG = rf"[A-Za-z0-9{_UTF8}]"
_SUB_DOMAIN = rf"{_LET_DIG}(?:[A-Za-z0-9\-{_UTF8}]*{_LET_DIG})?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_ADDRESS_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_MAILBOX = rf"(?:{_DOT_STRING}|{_QUOTED_STRING})@(?:{_DOMAIN}|{_ADDRESS_LITERAL})"
_SOURCE_ROUTE = rf"@{_DOMAIN}(?:,@{_DOMAIN})*:"

_PATH = re.compile(rf"<(?:{_SOURCE_ROUTE})?(?P<mailbox>{_MAILBOX})>")
# Many clients omit the angle brackets; the mailbox alone is taken too.
_BARE_MAILBOX = re.compile(rf"(?P<mailbox>{_MAILBOX})")

# RFC 5321 4.5.3.1: local part 64 octets, domain 255, whole path 256.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


def parse_path(text: str) -> tuple[str, str] | None:
    """(mailbox, parameters) from 'MAIL FROM:'/'RCPT TO:' arguments, or None if malformed.

    The null path "<>" gives an empty mailbox.
    """
    if text.startswith("<>"):
        mailbox, rest = "", text[2:]
    else:
        match = _PATH.match(text) or _BARE_MAILBOX.match(text)
        if match is None:
            return None
        mailbox, rest = match.group("mailbox"), text[match.end() :]
        local, _, domain = mailbox.rpartition("@")
        if (
            len(local.encode()) > MAX_LOCAL_PART
            or len(domain.encode()) > MAX_DOMAIN
            or len(mailbox.encode()) + 2 > MAX_PATH
        ):
            return None
    if rest and not rest.startswith(" "):
        return None
    return mailbox, rest.strip(" ")
