"""Who may send where: the anti-open-relay decision at RCPT time (pure)."""

from __future__ import annotations

import re

from kurrier.core.domains import InvalidDomain, normalise_domain
from kurrier.core.routing import CompiledPolicy, RoutingTable, domain_matches, domain_of
from kurrier.core.tenancy import inbound_tenant
from kurrier.ingress.smtp_path import MAX_PATH

# Local parts we will carry: RFC 5321 dot-atoms or quoted strings, but never
# the routing characters ('@' of a quoted "user@host", '%' and '!') that let old
# relays forward mail onward.
_LOCAL_PART_RE = re.compile(r'^([^\s@"<>()\[\]\\,;:%!]+|"[^"\\\r\n@%!]*")$')
# The reserved mailbox every relay has (RFC 5321 4.5.1), case-insensitive.
POSTMASTER = "postmaster"


def split_address(address: str) -> tuple[str, str] | None:
    """(local part, normalised domain) of a mailbox, or None if it is not one."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    if local.startswith("@") or not _LOCAL_PART_RE.match(local):
        return None
    try:
        domain = normalise_domain(domain)
    except InvalidDomain:
        return None
    # The path as it will be sent, A-labels and all, within RFC 5321 4.5.3.1.3's 256 octets.
    if len(f"<{local}@{domain}>".encode()) > MAX_PATH:
        return None
    return local, domain


def recipient_key(address: str) -> tuple[str, str] | None:
    """What makes two recipients of a transaction the same, or None if not a mailbox.

    The domain compares case-insensitively (and as A-labels); the local part
    exactly, as given: it is the destination's to interpret (RFC 5321 2.4), and
    a relay cannot know whether it folds case. Only "postmaster", case-insensitive
    by RFC 5321 4.5.1, is folded.
    """
    parts = split_address(address)
    if parts is None:
        return None
    local, domain = parts
    return (POSTMASTER if local.lower() == POSTMASTER else local), domain


def check_recipient(
    table: RoutingTable,
    client_ip: str,
    authenticated: bool,
    recipient: str,
    sender_domain: str,
    *,
    tenant: str | None = "",
    postmaster_domain: str = "",
) -> str | None:
    """None if the recipient is acceptable, else the SMTP reply refusing it.

    tenant is the message's (core/tenancy.py); None for a client that neither
    authenticated nor is trusted, whose mail is the recipient domain's tenant's.
    Only the routes governing that tenant's mail count. The postmaster at
    postmaster_domain (the relay's hostname) is accepted from anyone (RFC 5321
    4.5.1): it is one fixed mailbox, so no open relay. Like any recipient it
    needs a route.
    """
    parts = split_address(recipient)
    if parts is None:
        return f"501 5.1.3 <{recipient}>: bad recipient address syntax"
    local, domain = parts
    own_postmaster = local.lower() == POSTMASTER and domain == postmaster_domain
    if not (
        own_postmaster
        or authenticated
        or table.accepts_inbound(domain)
        or table.is_trusted(client_ip)
    ):
        return f"554 5.7.1 <{recipient}>: relay access denied"
    if not table.knows_recipient(local, domain):
        # Refused now, from anyone: accepted, it would bounce to a sender who may be forged.
        return f"550 5.1.1 <{recipient}>: recipient unknown"
    if tenant is None:
        tenant = inbound_tenant(table, domain)
    if table.route_for(domain, sender_domain, tenant) is None:
        return f"451 4.4.0 <{recipient}>: no route to the recipient's domain, try again later"
    return None


def check_sender(address: str) -> str | None:
    """None if MAIL FROM is acceptable: the null sender or a mailbox."""
    if address == "" or split_address(address) is not None:
        return None
    return f"501 5.1.7 <{address}>: bad sender address syntax"


def check_sender_identity(
    policy: CompiledPolicy, identity: str, trusted: bool, sender: str
) -> str | None:
    """None if this client may use MAIL FROM sender, else the 553 refusing it.

    With senderRules, an authenticated identity may only use the domains its
    rules (or the "*" identity's) list. The domains named in any rule belong to
    the relay's users: an untrusted client that did not authenticate cannot
    claim them (a forged local sender).
    """
    domain = domain_of(sender)
    rules = policy.sender_rules
    if not domain or not rules:
        return None
    if identity:
        allowed = (
            pattern for who, patterns in rules if who in (identity, "*") for pattern in patterns
        )
        if any(domain_matches(pattern, domain) for pattern in allowed):
            return None
        return f"553 5.7.1 <{sender}>: sender address not allowed for this login"
    if trusted:
        return None
    owned = (pattern for _, patterns in rules for pattern in patterns if pattern != "*")
    if any(domain_matches(pattern, domain) for pattern in owned):
        return f"553 5.7.1 <{sender}>: sender address requires authentication"
    return None
