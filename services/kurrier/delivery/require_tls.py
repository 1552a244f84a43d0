"""REQUIRETLS (RFC 8689) and the TLS-Required header field on the way out (pure).

A message whose client gave REQUIRETLS goes only to a hop that is spoken to
in TLS with a certificate verified for its name (the route's TLS mode is
raised to `verify`, or `dane`), that offers REQUIRETLS after STARTTLS,
and, on MX routes, whose name came from an authenticated source: the
domain's MTA-STS policy in enforce mode, or DANE (delivery/dane.py); an MX
record alone does not do. A hop that fails any of these is not sent the message and the next
one is tried; when every hop was reached and none met them, the message
bounces with 5.7.30 (REQUIRETLS support required) rather than waiting for a
hop to change. A hop that could not be reached at all defers, as usual.

A message without REQUIRETLS whose header says "TLS-Required: No" (RFC 8689
5) asks that recipient-side policy not hold it back: the destination's
MTA-STS policy is not applied to it. The route's own TLS mode still is: that
is the relay operator's policy, not the recipient's.
"""

from __future__ import annotations

import re
from typing import Literal

from kurrier.core.smtp_text import header_section
from kurrier.delivery.smtp_client import Reply, SmtpSession

# How a message wants TLS: REQUIRETLS, "TLS-Required: No", or neither.
TlsDemand = Literal["required", "optional", "default"]
KEYWORD = "REQUIRETLS"
STATUS = "5.7.30"
_TLS_REQUIRED_NO = re.compile(rb"^tls-required[ \t]*:[ \t]*no[ \t]*\r?$", re.I | re.M)


def demand_of(require_tls: bool, message: bytes) -> TlsDemand:
    """REQUIRETLS wins over the header field, which RFC 8689 4.1 says to ignore then."""
    if require_tls:
        return "required"
    header = re.sub(rb"\r\n[ \t]+", b" ", header_section(message))  # unfolded
    return "optional" if _TLS_REQUIRED_NO.search(header) else "default"


def hop_tls_mode(route_mode: str, demand: TlsDemand) -> str:
    return "verify" if demand == "required" else route_mode


def unauthenticated_mx(domain: str) -> str:
    """The reply when the MX hosts of domain cannot be trusted with REQUIRETLS mail."""
    return (
        f"550 {STATUS} the MX hosts of {domain} are not authenticated: REQUIRETLS needs "
        "an MTA-STS policy in enforce mode, or DANE"
    )


def unable(hop: str, why: str) -> Reply:
    """The refusal of a hop whose TLS cannot carry a REQUIRETLS message."""
    return Reply(550, f"{STATUS} {hop} cannot take a REQUIRETLS message: {why}")


def session_refusal(session: SmtpSession, hop: str) -> Reply | None:
    """Why an open session may not be sent a REQUIRETLS message; None if it may."""
    if not session.tls:
        return unable(hop, "no TLS")
    if KEYWORD not in session.extensions:
        return unable(hop, "it does not offer REQUIRETLS")
    return None
