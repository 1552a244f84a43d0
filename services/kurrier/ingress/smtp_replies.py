"""Replies as they go out: no client bytes echoed raw, and enhanced status codes.

aiosmtpd echoes client text in a few replies: an unknown command's name
('500 Error: command "..." not recognized') and VRFY's argument ('502 Could
not VRFY ...'). A NUL, an escape sequence or a bare CR there reaches the
client's terminal or log, or another parser, and an undecodable octet
(surrogate-escaped) made the reply's encoding fail. The unknown command is
not repeated at all (Postfix too answers "Error: command not recognized"),
and no reply keeps a control character, C1 control, line separator or lone
surrogate.

Enhanced status codes (RFC 3463) on every refusal, since EHLO offers
ENHANCEDSTATUSCODES: aiosmtpd's own replies ("503 Error: need MAIL command")
carry none; a client that parses them gets the generic code of RFC 3463 for
the basic code.
"""

from __future__ import annotations

import re

from kurrier.core.smtp_text import enhanced_status

_UNRECOGNISED = re.compile(r'500 Error: command ".*" not recognized', re.DOTALL)
UNRECOGNISED = "500 Error: command not recognized"
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

_FOR_BASIC_CODE = {
    "421": "4.3.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "552": "5.3.4",
    "553": "5.1.3",
    "555": "5.5.4",
}


def with_enhanced_code(reply: str) -> str:
    """reply with an enhanced code after the basic one, if it is a 4xx/5xx without one."""
    if len(reply) < 4 or reply[0] not in "45" or reply[3] not in " -":
        return reply
    if enhanced_status(reply):
        return reply
    code = _FOR_BASIC_CODE.get(reply[:3], f"{reply[0]}.0.0")
    return f"{reply[:4]}{code} {reply[4:]}".rstrip()


def safe_reply(reply: str) -> str:
    """reply without the client text aiosmtpd echoes, and without unprintable characters."""
    if reply.startswith('500 Error: command "') and _UNRECOGNISED.fullmatch(reply):
        return UNRECOGNISED
    if reply.isprintable():  # nearly every reply; the check is one C-speed pass
        return reply
    return _UNPRINTABLE.sub("", reply)
