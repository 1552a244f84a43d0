"""The routing table: compiled from resources by one pure function, used by every service.

The operator (cluster) and `kurrier up` (file) both call `compile_table`; the
result is published as JSON in NATS KV and every service swaps it in whole.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from kurrier.core.dkim_keys import DkimKeyError, signing_key
from kurrier.core.domains import InvalidDomain, normalise_domain
from kurrier.core.durations import parse_duration
from kurrier.core.resources import (
    BOUNCE_SCOPES,
    BounceScope,
    RelayDomain,
    RelayPolicy,
    RelayRoute,
    Resource,
    Secret,
)
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

DEFAULT_MAX_MESSAGE_SIZE = 26214400
DEFAULT_MAX_RECIPIENTS = 100
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 20
_MEMO_LIMIT = 65536

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

K = TypeVar("K")
V = TypeVar("V")


def _remembered(memo: dict[K, V], key: K, compute: Callable[[], V]) -> V:
    """memo[key], computed once; a memo past _MEMO_LIMIT starts again (a table lives
    for one revision, its lookups for the keys its traffic brings)."""
    if key not in memo:
        if len(memo) > _MEMO_LIMIT:
            memo.clear()
        memo[key] = compute()
    return memo[key]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Problem(_Frozen):
    """Something wrong with one resource, for its status and for logs."""

    kind: str
    namespace: str
    name: str
    reason: str
    message: str


class CompiledRoute(_Frozen):
    name: str
    priority: int
    # The namespace whose mail this route carries (core/tenancy.py); the
    # platform's routes carry everyone's. "" without tenancy.
    namespace: str = ""
    recipient_domains: tuple[str, ...]
    sender_domains: tuple[str, ...] = ()
    smarthost: tuple[str, int] | None = None
    mx: bool = False
    tls_mode: str = "opportunistic"
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    max_connections: int = 10
    rate_per_minute: int | None = None
    # spec.shaping: per destination site, across all delivery processes.
    site_max_connections: int | None = None
    site_per_minute: int | None = None
    # Set when the route is declared but cannot be used (e.g. its auth Secret is
    # missing). Mail for it is deferred rather than falling through to a route
    # the user did not choose for it.
    problem: str | None = None

    @property
    def destination(self) -> str:
        """A stable name of where this route sends mail, for connection pools and logs."""
        if self.smarthost is not None:
            return f"smarthost:{self.smarthost[0]}:{self.smarthost[1]}"
        return "mx"


class CompiledDkimKey(_Frozen):
    selector: str
    private_key: str = Field(repr=False)


class CompiledDomain(_Frozen):
    domain: str
    accept_inbound: bool
    # The namespace that declared it (core/tenancy.py); "" without tenancy.
    namespace: str = ""
    # Usable keys only, in the order their signatures go on the message.
    dkim_keys: tuple[CompiledDkimKey, ...] = ()
    # The domain's mailboxes, local parts case-folded and sorted; None: any local part.
    recipients: tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_key_as_published_before(cls, data: Any) -> Any:
        """A table from an operator that knew one key per domain (dkim_selector and
        dkim_private_key): a pod of this version reads it while the operator is upgraded."""
        if isinstance(data, dict) and "dkim_selector" in data:
            data = dict(data)
            selector, key = data.pop("dkim_selector"), data.pop("dkim_private_key", None)
            if selector and key:
                data["dkim_keys"] = [{"selector": selector, "private_key": key}]
        return data


class Quota(_Frozen):
    """A tenant's mail per minute and per day (None: not limited)."""

    messages_per_minute: int | None = None
    messages_per_day: int | None = None
    recipients_per_minute: int | None = None
    recipients_per_day: int | None = None


class CompiledPolicy(_Frozen):
    trusted_networks: tuple[str, ...] = ()
    require_tls_for_auth: bool = True
    users: dict[str, str] = Field(default_factory=dict, repr=False)
    service_account_audience: str | None = None
    sender_rules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # With tenancy (core/tenancy.py): the namespace of each user and trusted
    # network, and each tenant's own sender rules (sender_rules holds the
    # platform's, which grant tenants their sender domains).
    user_namespaces: dict[str, str] = Field(default_factory=dict)
    network_namespaces: dict[str, str] = Field(default_factory=dict)
    tenant_sender_rules: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = Field(
        default_factory=dict
    )
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    rate_per_minute: int | None = None
    identity_rate_per_minute: int | None = None
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    limit_trusted_networks: bool = False
    bounce_unauthenticated: BounceScope = "relayDomains"
    # Seconds a message waits before its sender is warned (0: never); None
    # leaves it to the queue's --delay-warning-time.
    delay_warning_time: float | None = None
    # With tenancy: each tenant namespace's quota, "*" for those not named.
    namespace_quotas: dict[str, Quota] = Field(default_factory=dict)

    def quota_for(self, tenant: str) -> Quota | None:
        return self.namespace_quotas.get(tenant) or self.namespace_quotas.get("*")


# Modular-crypt prefixes of the password hashes a users Secret may hold.
_HASH_SCHEMES = {
    "$2a$": "bcrypt",
    "$2b$": "bcrypt",
    "$2y$": "bcrypt",
    "$argon2id$": "argon2",
    "$argon2i$": "argon2",
    "$argon2d$": "argon2",
}


def password_hash_scheme(value: str) -> str | None:
    """'bcrypt' or 'argon2' for a hash in modular-crypt form; None for anything else."""
    return next((name for prefix, name in _HASH_SCHEMES.items() if value.startswith(prefix)), None)


def domain_matches(pattern: str, domain: str) -> bool:
    """'*' matches everything, '*.x.org' matches subdomains of x.org, else exact."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def domain_of(address: str) -> str:
    """The normalised domain of a mailbox; '' for the null sender or a bare local part.

    Ingress and Enqueue refuse any domain IDNA 2008 refuses, but a message
    stored by an older version (IDNA 2003) may hold one: it is taken as
    written, lower-cased, so the message still routes, defers or bounces
    like any other instead of failing every queue and delivery step it meets.
    """
    _, at, domain = address.rpartition("@")
    if not (at and domain):
        return ""
    try:
        return normalise_domain(domain)
    except InvalidDomain:
        return domain.lower()


# The table's compatibility rule across versions (docs/architecture.md,
# Contracts): a field is only ever added, with a default that means what the
# version before does without it, and keeps its name, its default and its
# meaning; it is stored only when set otherwise (seal_table). So a pod of the
# version before reads every table that uses nothing added since, and refuses
# one that does, keeping its last table (TableFollower), rather than apply a
# feature it does not know only in part.
class RoutingTable(_Frozen):
    revision: int = 0
    routes: tuple[CompiledRoute, ...] = ()
    domains: tuple[CompiledDomain, ...] = ()
    policy: CompiledPolicy = CompiledPolicy()
    # The namespace whose resources govern everyone's mail; "" when there is
    # no tenancy and every resource does (core/tenancy.py).
    platform_namespace: str = ""

    # Indexes derived once per table, so lookups stay off the per-recipient hot path.
    _domains_by_name: dict[str, CompiledDomain] = PrivateAttr(default_factory=dict)
    _recipient_sets: dict[str, frozenset[str]] = PrivateAttr(default_factory=dict)
    _networks: tuple[IPNetwork, ...] = PrivateAttr(default=())
    _route_memo: dict[tuple[str, str, str], CompiledRoute | None] = PrivateAttr(
        default_factory=dict
    )
    # Asked several times per message (policy, limits, tenancy), for few clients.
    _network_memo: dict[str, str | None] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._domains_by_name = {entry.domain: entry for entry in self.domains}
        self._recipient_sets = {
            entry.domain: frozenset(entry.recipients)
            for entry in self.domains
            if entry.recipients is not None
        }
        # Most specific first: a tenant's network inside the platform's is the tenant's.
        self._networks = tuple(
            sorted(
                (ipaddress.ip_network(n) for n in self.policy.trusted_networks),
                key=lambda network: -network.prefixlen,
            )
        )

    def governs(self, namespace: str, tenant: str) -> bool:
        """Whether a resource of namespace applies to the mail of tenant: its own
        and the platform's do ("" is the platform's mail, as is every message
        without tenancy)."""
        return namespace in (self.platform_namespace, tenant)

    def route_for(
        self, recipient_domain: str, sender_domain: str = "", tenant: str = ""
    ) -> CompiledRoute | None:
        """The first matching route of those governing tenant's mail; compile_table
        keeps them in priority order."""
        key = (recipient_domain, sender_domain, tenant)
        return _remembered(self._route_memo, key, lambda: self._match(*key))

    def _match(
        self, recipient_domain: str, sender_domain: str, tenant: str
    ) -> CompiledRoute | None:
        for route in self.routes:
            if not self.governs(route.namespace, tenant):
                continue
            if not any(domain_matches(p, recipient_domain) for p in route.recipient_domains):
                continue
            if route.sender_domains and not any(
                domain_matches(p, sender_domain) for p in route.sender_domains
            ):
                continue
            return route
        return None

    def domain(self, name: str) -> CompiledDomain | None:
        return self._domains_by_name.get(name)

    def inbound_owner(self, recipient_domain: str) -> str | None:
        """The namespace whose RelayDomain accepts mail for recipient_domain from
        anyone, or None when none does."""
        entry = self._domains_by_name.get(recipient_domain)
        return entry.namespace if entry is not None and entry.accept_inbound else None

    def accepts_inbound(self, recipient_domain: str) -> bool:
        return self.inbound_owner(recipient_domain) is not None

    def knows_recipient(self, local_part: str, domain: str) -> bool:
        """Whether local_part@domain may be a mailbox: false only for a domain that lists
        its mailboxes without this one. Local parts compare case-insensitively, as
        Postfix's recipient maps do: the list is the domain's, written by its
        operator, and no mailbox should differ from another by case alone.
        postmaster is always one (RFC 5321 4.5.1)."""
        entry = self._domains_by_name.get(domain)
        if entry is None or entry.recipients is None:
            return True
        folded = local_part.lower()
        return folded == "postmaster" or folded in self._recipient_sets[domain]

    def trusted_network_of(self, client_ip: str) -> str | None:
        """The most specific trusted network client_ip is in, or None."""
        return _remembered(self._network_memo, client_ip, lambda: self._network_of(client_ip))

    def _network_of(self, client_ip: str) -> str | None:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return None
        return next((str(n) for n in self._networks if address in n), None)

    def is_trusted(self, client_ip: str) -> bool:
        return self.trusted_network_of(client_ip) is not None

    def limits_client(self, client_ip: str) -> bool:
        """Whether the per-client limits (connections, message rate) apply to client_ip:
        trusted networks relay without AUTH and are exempt, unless limitTrustedNetworks."""
        return self.policy.limit_trusted_networks or not self.is_trusted(client_ip)


def _namespace(resource: RelayDomain | RelayRoute | RelayPolicy | Secret) -> str:
    return resource.metadata.namespace or "default"


def _display_name(resource: RelayDomain | RelayRoute | RelayPolicy) -> str:
    namespace = resource.metadata.namespace
    return f"{namespace}/{resource.metadata.name}" if namespace else resource.metadata.name


def _compile_route(
    route: RelayRoute, secrets: dict[tuple[str, str], Secret], problems: list[Problem], owner: str
) -> CompiledRoute:
    spec = route.spec
    username = password = problem = None
    if spec.auth is not None:
        secret = secrets.get((_namespace(route), spec.auth.secretRef.name))
        user_bytes = secret.value("username") if secret else None
        password_bytes = secret.value("password") if secret else None
        if secret is None:
            problem = f"auth Secret {spec.auth.secretRef.name!r} not found"
        elif user_bytes is None or password_bytes is None:
            problem = f"auth Secret {spec.auth.secretRef.name!r} lacks 'username' or 'password'"
        else:
            username, password = user_bytes.decode(), password_bytes.decode()
    if problem:
        problems.append(_problem(route, "SecretInvalid", problem))
    smarthost = spec.destination.smarthost
    return CompiledRoute(
        name=_display_name(route),
        priority=spec.priority,
        namespace=owner,
        recipient_domains=tuple(spec.match.recipientDomains),
        sender_domains=tuple(spec.match.senderDomains),
        smarthost=(smarthost.host, smarthost.port) if smarthost else None,
        mx=spec.destination.mx is not None,
        tls_mode=spec.tls.mode,
        username=username,
        password=password,
        max_connections=spec.maxConnections,
        rate_per_minute=spec.rateLimit.perMinute if spec.rateLimit else None,
        site_max_connections=spec.shaping.maxConnections if spec.shaping else None,
        site_per_minute=spec.shaping.messagesPerMinute if spec.shaping else None,
        problem=problem,
    )


def dkim_keys(
    domain: RelayDomain, secrets: Mapping[tuple[str, str], Secret]
) -> tuple[list[CompiledDkimKey], list[Problem]]:
    """The RelayDomain's usable DKIM keys, and a problem for each one that is not."""
    keys: list[CompiledDkimKey] = []
    problems: list[Problem] = []
    for wanted in domain.spec.dkim.signing_keys if domain.spec.dkim else ():
        ref = wanted.secretRef
        secret = secrets.get((_namespace(domain), ref.name))
        pem = secret.value(ref.key) if secret else None
        if pem is None or b"PRIVATE KEY-----" not in pem:
            problem = f"DKIM Secret {ref.name!r} has no PEM private key under {ref.key!r}"
            problems.append(_problem(domain, "SecretInvalid", problem))
            continue
        try:
            signing_key(pem)
        except DkimKeyError as error:
            problems.append(_problem(domain, "SecretInvalid", f"DKIM Secret {ref.name!r}: {error}"))
            continue
        keys.append(CompiledDkimKey(selector=wanted.selector, private_key=pem.decode()))
    return keys, problems


def _compile_domain(
    domain: RelayDomain,
    secrets: dict[tuple[str, str], Secret],
    problems: list[Problem],
    owner: str,
) -> CompiledDomain:
    keys, key_problems = dkim_keys(domain, secrets)
    problems.extend(key_problems)
    return CompiledDomain(
        domain=domain.spec.domain,
        accept_inbound=domain.spec.acceptInbound,
        namespace=owner,
        dkim_keys=tuple(keys),
        recipients=None
        if domain.spec.recipients is None
        else tuple(sorted({local.lower() for local in domain.spec.recipients})),
    )


def _compile_policy(
    policies: list[RelayPolicy],
    secrets: dict[tuple[str, str], Secret],
    problems: list[Problem],
    platform: str,
) -> CompiledPolicy:
    """Several policies merge into the strictest reading of all of them.

    Networks, users and sender rules add up; limits take the lowest value;
    TLS before AUTH is required if any policy requires it; bounces for
    unauthenticated mail go as far as the narrowest scope; a delay warning
    goes at the earliest age any policy sets. What cannot be both (a
    ServiceAccount audience, a user's password hash, a trusted network) is
    taken from the policy that comes first by `_precedence`, and the others
    are told. With tenancy (platform set) the limits are the platform's
    policies' alone, and each tenant's sender rules bind only its own
    identities (core/tenancy.py).
    """
    if not policies:
        return CompiledPolicy()
    policies = sorted(policies, key=lambda p: _precedence(p, platform))
    limiting = [p for p in policies if not platform or _namespace(p) == platform] or [
        RelayPolicy.model_validate(_DEFAULT_POLICY)
    ]
    networks: dict[IPNetwork, tuple[str, str]] = {}  # network -> (namespace, declared by)
    users: dict[str, str] = {}
    user_namespaces: dict[str, str] = {}
    rules: list[tuple[str, tuple[str, ...]]] = []
    tenant_rules: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    audience, audience_from = "", ""
    for policy in policies:
        spec = policy.spec
        owner = _namespace(policy) if platform else ""
        _add_networks(policy, owner, platform, networks, problems)
        policy_rules = [(rule.identity, tuple(rule.domains)) for rule in spec.senderRules]
        if owner and owner != platform:
            tenant_rules.setdefault(owner, []).extend(policy_rules)
        else:
            rules.extend(policy_rules)
        if spec.auth is None:
            continue
        wanted = spec.auth.serviceAccountAudience or ""
        if wanted and not audience:
            audience, audience_from = wanted, _display_name(policy)
        elif wanted and wanted != audience:
            message = (
                f"serviceAccountAudience {wanted!r} ignored: {audience_from} sets {audience!r}"
            )
            problems.append(_problem(policy, "Conflict", message))
        if spec.auth.usersSecretRef is not None:
            added = _add_users(policy, spec.auth.usersSecretRef.name, secrets, users, problems)
            user_namespaces.update((user, owner) for user in added if owner)
    rates = [p.spec.rateLimit.perClientPerMinute for p in limiting if p.spec.rateLimit]
    identity_rates = [p.spec.rateLimit.perIdentityPerMinute for p in limiting if p.spec.rateLimit]
    return CompiledPolicy(
        trusted_networks=tuple(str(network) for network in networks),
        require_tls_for_auth=any(p.spec.requireTLSForAuth for p in limiting),
        users=users,
        service_account_audience=audience or None,
        sender_rules=tuple(rules),
        user_namespaces=user_namespaces,
        network_namespaces={str(n): owner for n, (owner, _) in networks.items() if owner},
        tenant_sender_rules={owner: tuple(found) for owner, found in tenant_rules.items()},
        max_message_size=min(p.spec.maxMessageSize for p in limiting),
        max_recipients=min(p.spec.maxRecipients for p in limiting),
        rate_per_minute=min((r for r in rates if r is not None), default=None),
        identity_rate_per_minute=min((r for r in identity_rates if r is not None), default=None),
        max_connections_per_client=min(p.spec.maxConnectionsPerClient for p in limiting),
        limit_trusted_networks=any(p.spec.limitTrustedNetworks for p in limiting),
        bounce_unauthenticated=min(
            (p.spec.bounceUnauthenticated for p in limiting), key=BOUNCE_SCOPES.index
        ),
        delay_warning_time=_earliest_warning(limiting),
        namespace_quotas=_namespace_quotas(limiting) if platform else {},
    )


def _namespace_quotas(policies: list[RelayPolicy]) -> dict[str, Quota]:
    """Each namespace's quota; where several policies name one, the lowest of each number."""
    fields = {
        "messages_per_minute": "messagesPerMinute",
        "messages_per_day": "messagesPerDay",
        "recipients_per_minute": "recipientsPerMinute",
        "recipients_per_day": "recipientsPerDay",
    }
    quotas: dict[str, dict[str, int]] = {}
    for quota in (q for p in policies for q in p.spec.namespaceQuotas):
        numbers = quotas.setdefault(quota.namespace, {})
        for name, spelled in fields.items():
            value = getattr(quota, spelled)
            if value is not None:
                numbers[name] = min(value, numbers.get(name, value))
    return {namespace: Quota(**numbers) for namespace, numbers in quotas.items()}


def _earliest_warning(policies: list[RelayPolicy]) -> float | None:
    """The shortest delayWarningTime the policies set: a sender is told as soon as any
    policy says; warnings are off ("0s") only when every policy that sets one says so."""
    ages = [parse_duration(p.spec.delayWarningTime) for p in policies if p.spec.delayWarningTime]
    if not ages:
        return None
    return min((age for age in ages if age > 0), default=0.0)


# A tenant's policies set no limits: without a platform policy, the defaults apply.
_DEFAULT_POLICY = {
    "apiVersion": "kurrier.io/v1alpha1",
    "kind": "RelayPolicy",
    "metadata": {"name": "defaults"},
    "spec": {},
}


def _add_networks(
    policy: RelayPolicy,
    owner: str,
    platform: str,
    networks: dict[IPNetwork, tuple[str, str]],
    problems: list[Problem],
) -> None:
    """The policy's trusted networks. With tenancy, a tenant's network must lie inside
    one the platform trusts (a tenant cannot open the relay to addresses the platform
    does not trust) and may not overlap another tenant's (its clients' mail would be
    both namespaces'); one that does is left out, and the policy told. The platform's
    policies come first (`_precedence`), so their networks are known by then."""
    for text in policy.spec.trustedNetworks:
        network = ipaddress.ip_network(text)
        if platform and owner != platform:
            problem = _tenant_network_problem(network, owner, platform, networks)
            if problem:
                message = f"trusted network {text} {problem}; ignored"
                problems.append(_problem(policy, "Conflict", message))
                continue
        networks.setdefault(network, (owner, _display_name(policy)))


def _tenant_network_problem(
    network: IPNetwork, owner: str, platform: str, networks: dict[IPNetwork, tuple[str, str]]
) -> str | None:
    """Why tenant owner may not claim network, or None."""
    ours = [(n, claim) for n, claim in networks.items() if n.version == network.version]
    if not any(
        namespace == platform and network.subnet_of(other)  # type: ignore[arg-type]
        for other, (namespace, _) in ours
    ):
        return "is not inside a trusted network of the platform's RelayPolicies"
    for other, (namespace, by) in ours:
        if namespace not in (owner, platform) and other.overlaps(network):
            return f"overlaps {other}, claimed by {by}"
    return None


def _precedence(resource: RelayDomain | RelayPolicy, platform: str) -> tuple[bool, str, str, str]:
    """Which of two resources claiming one thing keeps it: the platform's, then the
    older, then by name.

    The older one keeps it, so creating a resource never takes a domain or a
    user from one already in use, and a tenant never takes one from the
    platform; the order is the same on every replica and after every restart.
    Resources from a file have no creation time: namespace and name decide.
    """
    created = resource.metadata.creationTimestamp or ""
    tenant = bool(platform) and _namespace(resource) != platform
    return (tenant, created, _namespace(resource), resource.metadata.name)


def _add_users(
    policy: RelayPolicy,
    ref: str,
    secrets: dict[tuple[str, str], Secret],
    users: dict[str, str],
    problems: list[Problem],
) -> list[str]:
    """Adds the users of a policy's Secret, and names them; a name another policy
    defined first keeps that hash."""
    added: list[str] = []
    secret = secrets.get((_namespace(policy), ref))
    if secret is None:
        problems.append(_problem(policy, "SecretInvalid", f"users Secret {ref!r} not found"))
        return added
    for user in sorted({*secret.data, *secret.stringData}):
        value = (secret.value(user) or b"").decode(errors="replace").strip()
        if password_hash_scheme(value) is None:
            # Never a plaintext password: the user is left out, and told why.
            problems.append(
                _problem(
                    policy,
                    "SecretInvalid",
                    f"users Secret {ref!r}: {user!r} is not a bcrypt or argon2 hash",
                )
            )
        elif users.setdefault(user, value) != value:
            # Two passwords for one name would let either in: only the first counts.
            problems.append(
                _problem(
                    policy,
                    "Conflict",
                    f"users Secret {ref!r}: {user!r} is defined by an earlier policy; ignored",
                )
            )
        else:
            added.append(user)
    return added


def _problem(
    resource: RelayDomain | RelayRoute | RelayPolicy, reason: str, message: str
) -> Problem:
    return Problem(
        kind=resource.kind,
        namespace=_namespace(resource),
        name=resource.metadata.name,
        reason=reason,
        message=message,
    )


def compile_table(
    resources: Iterable[Resource], revision: int = 0, platform_namespace: str = ""
) -> tuple[RoutingTable, list[Problem]]:
    """Compile resources (with the Secrets they reference) into one routing table.

    platform_namespace turns on tenancy (core/tenancy.py): each resource then
    governs the mail of its own namespace, and those of platform_namespace
    everyone's. "" keeps one table for all.
    """
    resources = list(resources)
    platform = platform_namespace
    secrets = {(_namespace(r), r.metadata.name): r for r in resources if isinstance(r, Secret)}
    problems: list[Problem] = []

    def owner(resource: RelayDomain | RelayRoute | RelayPolicy) -> str:
        return _namespace(resource) if platform else ""

    routes = sorted(
        (
            _compile_route(r, secrets, problems, owner(r))
            for r in resources
            if isinstance(r, RelayRoute)
        ),
        key=lambda route: (-route.priority, route.name),
    )
    domains: dict[str, CompiledDomain] = {}
    declared_by: dict[str, RelayDomain] = {}
    for resource in sorted(
        (r for r in resources if isinstance(r, RelayDomain)),
        key=lambda r: _precedence(r, platform),
    ):
        holder = declared_by.get(resource.spec.domain)
        if holder is not None:
            problems.append(
                _problem(
                    resource,
                    "Conflict",
                    f"domain {resource.spec.domain!r} is declared by more than one RelayDomain"
                    f" ({_display_name(holder)} keeps it)",
                )
            )
            continue
        domains[resource.spec.domain] = _compile_domain(
            resource, secrets, problems, owner(resource)
        )
        declared_by[resource.spec.domain] = resource
    for domain in domains.values():
        if domain.accept_inbound and not any(
            any(domain_matches(p, domain.domain) for p in route.recipient_domains)
            for route in routes
            if route.namespace in (platform, domain.namespace)
        ):
            # Reported on the RelayDomain that declared it, so its status can say so.
            problems.append(
                _problem(
                    declared_by[domain.domain],
                    "NoRoute",
                    f"mail for {domain.domain} is accepted but no RelayRoute matches it",
                )
            )
    policies = [r for r in resources if isinstance(r, RelayPolicy)]
    table = RoutingTable(
        revision=revision,
        routes=tuple(routes),
        domains=tuple(domains.values()),
        policy=_compile_policy(policies, secrets, problems, platform),
        platform_namespace=platform,
    )
    return table, problems
