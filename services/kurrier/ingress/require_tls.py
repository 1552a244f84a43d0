"""REQUIRETLS on MAIL FROM (RFC 8689): offered, and taken, only in a TLS session.

A client that gives it asks that its message travel on only over TLS with a
verified certificate to hops that offer REQUIRETLS too, or come back to it
(delivery/require_tls.py). Asked for over plaintext, the request itself
could have been stripped or forged on the way, so it is refused there.
"""

from __future__ import annotations

from aiosmtpd.smtp import Session
from kurrier.core.dsn_parameters import BadParameter

KEYWORD = "REQUIRETLS"
# What the parameter adds to MAIL's command line (RFC 5321 4.5.3.1.4).
LINE_GROWTH = len(" " + KEYWORD)
NEEDS_TLS = "530 5.7.10 REQUIRETLS needs a TLS session: STARTTLS first"


def offered(session: Session) -> bool:
    return session.ssl is not None


def asked(given: list[tuple[str, str | None]]) -> bool:
    """Whether MAIL FROM gave REQUIRETLS (a keyword with no value, given once)."""
    if len(given) > 1:
        raise BadParameter(f"{KEYWORD} given twice")
    if given and given[0][1] is not None:
        raise BadParameter(f"{KEYWORD} takes no value")
    return bool(given)
