"""Namespaces as tenants: whose resources govern a message, and which senders it may use.

With tenancy (the operator's --platform-namespace), every message belongs to
one namespace, its tenant, chosen by who submitted it:

- a ServiceAccount token: the ServiceAccount's namespace;
- a user of a RelayPolicy's users Secret: that policy's namespace;
- a client in a trusted network: the namespace of the RelayPolicy claiming it;
- anyone else (mail for an acceptInbound domain): the namespace of that
  RelayDomain, decided by the transaction's first recipient.

Its tenant's resources and the platform namespace's govern it: only their
routes carry it (RoutingTable.route_for), and an identified tenant may use as
sender domains only those its own RelayDomains declare or the platform's
sender rules grant it (`check_tenant_sender`). Without tenancy every tenant is
"" and every resource governs every message.
"""

from __future__ import annotations

from kurrier.core.routing import RoutingTable, domain_matches, domain_of

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
# A platform sender rule's identity naming every identity of one tenant.
NAMESPACE_IDENTITY_PREFIX = "namespace:"


def tenant_of(table: RoutingTable, identity: str, client_ip: str) -> str | None:
    """The tenant an authenticated identity or a trusted client belongs to; None for
    a client that is neither (its recipients' domains decide: `inbound_tenant`)."""
    if not table.platform_namespace:
        return "" if identity or table.is_trusted(client_ip) else None
    if identity.startswith(SERVICE_ACCOUNT_PREFIX):
        namespace, _, _ = identity.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
        return namespace
    if identity:
        return table.policy.user_namespaces.get(identity, table.platform_namespace)
    network = table.trusted_network_of(client_ip)
    if network is None:
        return None
    return table.policy.network_namespaces.get(network, table.platform_namespace)


def inbound_tenant(table: RoutingTable, recipient_domain: str) -> str:
    """The tenant of anonymous mail for recipient_domain: the namespace accepting it
    (the platform's when no RelayDomain does, as for the relay's postmaster)."""
    return table.inbound_owner(recipient_domain) or table.platform_namespace


def is_tenant(table: RoutingTable, tenant: str) -> bool:
    """Whether tenant is a namespace other than the platform's, bound by the tenancy rules."""
    return bool(table.platform_namespace) and tenant not in ("", table.platform_namespace)


def check_tenant_sender(table: RoutingTable, tenant: str, identity: str, sender: str) -> str | None:
    """None if tenant's identity may use MAIL FROM sender, else the 553 refusing it.

    A sender domain is the tenant's when one of its RelayDomains declares it,
    or when a platform sender rule for the identity, for "namespace:<tenant>"
    or for "*" lists it. The tenant's own sender rules for the identity (or
    its "*") narrow that further. The null sender is always allowed.
    """
    domain = domain_of(sender)
    if not domain:
        return None
    declared = table.domain(domain)
    owned = declared is not None and declared.namespace == tenant
    granted = any(
        domain_matches(pattern, domain)
        for who, patterns in table.policy.sender_rules
        if who in (identity, "*", NAMESPACE_IDENTITY_PREFIX + tenant) and who
        for pattern in patterns
    )
    if not (owned or granted):
        return f"553 5.7.1 <{sender}>: sender domain not allowed for namespace {tenant}"
    own_rules = [
        patterns
        for who, patterns in table.policy.tenant_sender_rules.get(tenant, ())
        if who in (identity, "*") and who
    ]
    if own_rules and not any(domain_matches(p, domain) for ps in own_rules for p in ps):
        return f"553 5.7.1 <{sender}>: sender address not allowed for this login"
    return None
