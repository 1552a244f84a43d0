"""Replies as they go out: no client bytes echoed raw, and enhanced status codes.

aiosmtpd echoes client text in a few replies: an unknown command's name
('500 Error: command "..." not recognized') and VRFY's argument ('502 Could
not VRFY ...'). A NUL, an escape sequence or a bare CR there reaches the
client's terminal or log, or another parser, and an undecodable octet
(surrogate-escaped) made the reply's encoding fail. The unknown command is
not repeated at all (Postfix too answers "Error: command not recognized"),
and no reply keeps a character str.isprintable() refuses: control
characters, C1 controls, line separators, lone surrogates, and format
characters such as the bidi overrides (U+202E would show a refused address
backwards in the client's log) and zero-width characters.

aiosmtpd ends a session after five unknown commands with "502 5.5.1 Too many
unrecognized commands, goodbye." and closes it; a server that closes the
channel says 421 (RFC 5321 3.8), as Postfix does past smtpd_hard_error_limit,
so a client knows not to send its next command into a closed connection.

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
_AIOSMTPD_GOODBYE = "502 5.5.1 Too many unrecognized commands, goodbye."
TOO_MANY_UNRECOGNISED = "421 4.7.0 Too many unrecognized commands, closing connection"

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
    """reply without the client text aiosmtpd echoes, without unprintable characters,
    and aiosmtpd's goodbye as a 421."""
    if reply.startswith('500 Error: command "') and _UNRECOGNISED.fullmatch(reply):
        return UNRECOGNISED
    if reply == _AIOSMTPD_GOODBYE:
        return TOO_MANY_UNRECOGNISED
    if reply.isprintable():  # nearly every reply; the check is one C-speed pass
        return reply
    return "".join(filter(str.isprintable, reply))
