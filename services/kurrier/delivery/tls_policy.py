"""TLS contexts for the route TLS modes (none | opportunistic | required | verify), and for
'dane', where the chain is matched against TLSA records after the handshake (dane.py)."""

from __future__ import annotations

import ssl
from functools import cache


@cache
def client_context(mode: str, ca_file: str | None = None) -> ssl.SSLContext | None:
    """The context for a mode; None for 'none'.

    'opportunistic', 'required' and 'dane' encrypt without authenticating the server,
    as Postfix's 'may' and 'encrypt' do; 'verify' checks the chain against
    ca_file (or the system store) and the host name.
    """
    if mode == "none":
        return None
    context = ssl.create_default_context(cafile=ca_file if mode == "verify" else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode != "verify":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
