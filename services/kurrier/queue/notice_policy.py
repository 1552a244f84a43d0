"""Whether the sender of a message may get delivery status notifications (pure).

A notification goes to MAIL FROM, which any client can set to any address.
From a client that neither authenticated nor is in trustedNetworks, a
notification to an address it never proved to own is backscatter: the
relay mails the attacker's text (the returned message, or its headers) to a
victim. RelayPolicy bounceUnauthenticated says how far such notifications
go: to every sender ("all", Postfix's behaviour), only to senders in one of
the relay's RelayDomains ("relayDomains", the default: the relay mails only
domains it serves itself), or to nobody ("none").
"""

from __future__ import annotations

from kurrier.core.message import MessageRecord
from kurrier.core.routing import RoutingTable, domain_of


def withheld_because(record: MessageRecord, table: RoutingTable) -> str | None:
    """Why no notification about record may go to its sender, or None if it may."""
    if record.authenticated_as or record.client_trusted:
        return None
    scope = table.policy.bounce_unauthenticated
    if scope == "all":
        return None
    if scope == "relayDomains" and table.domain(domain_of(record.mail_from)) is not None:
        return None
    return f"the client neither authenticated nor was trusted, and bounceUnauthenticated is {scope}"
