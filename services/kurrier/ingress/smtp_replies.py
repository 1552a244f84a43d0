"""Enhanced status codes (RFC 3463) on every refusal, since EHLO offers ENHANCEDSTATUSCODES.

aiosmtpd's own replies ("503 Error: need MAIL command") carry none; a client
that parses them gets the generic code of RFC 3463 for the basic code.
"""

from __future__ import annotations

from kurrier.core.smtp_text import enhanced_status

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
