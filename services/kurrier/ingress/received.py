"""The Received: trace header ingress adds to each message (RFC 5321 4.4)."""

from __future__ import annotations

import email.utils
import re
from typing import Any

_UNSAFE = re.compile(r"[^\x21-\x7e]|[()\\]")
_PRINTABLE_COMMENT = re.compile(r"[^\x20-\x7e]|\\")


def _clean(text: str) -> str:
    """Client-supplied text made safe for a header: printable ASCII, no comment syntax."""
    return _UNSAFE.sub("?", text)[:255]


def tls_description(ssl_info: dict[str, Any] | None) -> str:
    """What Postfix writes: 'using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)'."""
    if not ssl_info:
        return ""
    ssl_object = ssl_info.get("ssl_object")
    cipher = ssl_info.get("cipher") or (ssl_object.cipher() if ssl_object else None)
    version = ssl_object.version() if ssl_object else None
    if not cipher or not version:
        return "using TLS"
    name, _, bits = cipher
    return f"using {version} with cipher {name} ({bits}/{bits} bits)"


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
    # tls_detail is ours (tls_description), not the client's: spaces stay.
    tls_line = f"\t({_PRINTABLE_COMMENT.sub('?', tls_detail)})\r\n" if tls_detail else ""
    # Like Postfix, name the recipient only when there is exactly one.
    recipient = f"\r\n\tfor <{_clean(recipients[0])}>" if len(recipients) == 1 else ""
    date = email.utils.formatdate(timestamp, localtime=False)
    return (
        f"Received: from {_clean(helo) or 'unknown'} ([{client_ip}])\r\n"
        f"{tls_line}"
        f"\tby {hostname} (kurrier) with {protocol} id {queue_id}"
        f"{recipient}; {date}\r\n"
    ).encode("ascii", errors="replace")
