"""The Received: trace header ingress adds to each message (RFC 5321 4.4)."""

from __future__ import annotations

import email.utils
import re

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")


def _clean(text: str) -> str:
    """Client-supplied text made safe for a header: printable ASCII, no comment syntax."""
    return _UNSAFE.sub("?", text)[:255]


def protocol_name(*, smtputf8: bool, tls: bool, authenticated: bool) -> str:
    """The 'with' keyword (RFC 3848, RFC 6531)."""
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    timestamp: float,
    tls_detail: str = "",
) -> bytes:
    tls_comment = f" ({_clean(tls_detail)})" if tls_detail else ""
    # Like Postfix, name the recipient only when there is exactly one.
    recipient = f"\r\n\tfor <{_clean(recipients[0])}>" if len(recipients) == 1 else ""
    date = email.utils.formatdate(timestamp, localtime=False)
    return (
        f"Received: from {_clean(helo) or 'unknown'} ([{client_ip}])\r\n"
        f"\tby {hostname} (kurrier) with {protocol}{tls_comment} id {queue_id}"
        f"{recipient}; {date}\r\n"
    ).encode("ascii", errors="replace")
