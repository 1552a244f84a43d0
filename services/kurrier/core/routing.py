"""The routing table: compiled from resources by one pure function, used by every service.

The operator (cluster) and `kurrier up` (file) both call `compile_table`; the
result is published as JSON in NATS KV and every service swaps it in whole.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

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
_ROUTE_MEMO_LIMIT = 65536

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    recipient_domains: tuple[str, ...]
    sender_domains: tuple[str, ...] = ()
    smarthost: tuple[str, int] | None = None
    mx: bool = False
    tls_mode: str = "opportunistic"
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    max_connections: int = 10
    rate_per_minute: int | None = None
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
    # Usable keys only, in the order their signatures go on the message.
    dkim_keys: tuple[CompiledDkimKey, ...] = ()

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


class CompiledPolicy(_Frozen):
    trusted_networks: tuple[str, ...] = ()
    require_tls_for_auth: bool = True
    users: dict[str, str] = Field(default_factory=dict, repr=False)
    service_account_audience: str | None = None
    sender_rules: tuple[tuple[str, tuple[str, ...]], ...] = ()
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


class RoutingTable(_Frozen):
    revision: int = 0
    routes: tuple[CompiledRoute, ...] = ()
    domains: tuple[CompiledDomain, ...] = ()
    policy: CompiledPolicy = CompiledPolicy()

    # Indexes derived once per table, so lookups stay off the per-recipient hot path.
    _domains_by_name: dict[str, CompiledDomain] = PrivateAttr(default_factory=dict)
    _networks: tuple[IPNetwork, ...] = PrivateAttr(default=())
    _route_memo: dict[tuple[str, str], CompiledRoute | None] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        self._domains_by_name = {entry.domain: entry for entry in self.domains}
        self._networks = tuple(ipaddress.ip_network(n) for n in self.policy.trusted_networks)

    def route_for(self, recipient_domain: str, sender_domain: str = "") -> CompiledRoute | None:
        """The first matching route; compile_table keeps them in priority order."""
        key = (recipient_domain, sender_domain)
        if key not in self._route_memo:
            if len(self._route_memo) > _ROUTE_MEMO_LIMIT:
                self._route_memo.clear()
            self._route_memo[key] = self._match(recipient_domain, sender_domain)
        return self._route_memo[key]

    def _match(self, recipient_domain: str, sender_domain: str) -> CompiledRoute | None:
        for route in self.routes:
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

    def accepts_inbound(self, recipient_domain: str) -> bool:
        entry = self._domains_by_name.get(recipient_domain)
        return entry is not None and entry.accept_inbound

    def is_trusted(self, client_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

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
    route: RelayRoute, secrets: dict[tuple[str, str], Secret], problems: list[Problem]
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
        recipient_domains=tuple(spec.match.recipientDomains),
        sender_domains=tuple(spec.match.senderDomains),
        smarthost=(smarthost.host, smarthost.port) if smarthost else None,
        mx=spec.destination.mx is not None,
        tls_mode=spec.tls.mode,
        username=username,
        password=password,
        max_connections=spec.maxConnections,
        rate_per_minute=spec.rateLimit.perMinute if spec.rateLimit else None,
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
    domain: RelayDomain, secrets: dict[tuple[str, str], Secret], problems: list[Problem]
) -> CompiledDomain:
    keys, key_problems = dkim_keys(domain, secrets)
    problems.extend(key_problems)
    return CompiledDomain(
        domain=domain.spec.domain,
        accept_inbound=domain.spec.acceptInbound,
        dkim_keys=tuple(keys),
    )


def _compile_policy(
    policies: list[RelayPolicy], secrets: dict[tuple[str, str], Secret], problems: list[Problem]
) -> CompiledPolicy:
    """Several policies merge into the strictest reading of all of them.

    Networks, users and sender rules add up; limits take the lowest value;
    TLS before AUTH is required if any policy requires it; bounces for
    unauthenticated mail go as far as the narrowest scope; a delay warning
    goes at the earliest age any policy sets. What cannot be
    both (a ServiceAccount audience, a user's password hash) is taken from
    the policy that comes first by `_precedence`, and the others are told.
    """
    if not policies:
        return CompiledPolicy()
    policies = sorted(policies, key=_precedence)
    networks: list[str] = []
    users: dict[str, str] = {}
    rules: list[tuple[str, tuple[str, ...]]] = []
    audience, audience_from = "", ""
    rates: list[int] = []
    identity_rates: list[int] = []
    for policy in policies:
        spec = policy.spec
        networks.extend(n for n in spec.trustedNetworks if n not in networks)
        rules.extend((rule.identity, tuple(rule.domains)) for rule in spec.senderRules)
        limit = spec.rateLimit
        if limit is not None and limit.perClientPerMinute is not None:
            rates.append(limit.perClientPerMinute)
        if limit is not None and limit.perIdentityPerMinute is not None:
            identity_rates.append(limit.perIdentityPerMinute)
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
            _add_users(policy, spec.auth.usersSecretRef.name, secrets, users, problems)
    return CompiledPolicy(
        trusted_networks=tuple(networks),
        require_tls_for_auth=any(p.spec.requireTLSForAuth for p in policies),
        users=users,
        service_account_audience=audience or None,
        sender_rules=tuple(rules),
        max_message_size=min(p.spec.maxMessageSize for p in policies),
        max_recipients=min(p.spec.maxRecipients for p in policies),
        rate_per_minute=min(rates) if rates else None,
        identity_rate_per_minute=min(identity_rates) if identity_rates else None,
        max_connections_per_client=min(p.spec.maxConnectionsPerClient for p in policies),
        limit_trusted_networks=any(p.spec.limitTrustedNetworks for p in policies),
        bounce_unauthenticated=min(
            (p.spec.bounceUnauthenticated for p in policies), key=BOUNCE_SCOPES.index
        ),
        delay_warning_time=_earliest_warning(policies),
    )


def _earliest_warning(policies: list[RelayPolicy]) -> float | None:
    """The shortest delayWarningTime the policies set: a sender is told as soon as any
    policy says; warnings are off ("0s") only when every policy that sets one says so."""
    ages = [parse_duration(p.spec.delayWarningTime) for p in policies if p.spec.delayWarningTime]
    if not ages:
        return None
    return min((age for age in ages if age > 0), default=0.0)


def _precedence(resource: RelayDomain | RelayPolicy) -> tuple[str, str, str]:
    """Which of two resources claiming one thing keeps it: the older, then by name.

    The older one keeps it, so creating a resource never takes a domain or a
    user from one already in use; the order is the same on every replica and
    after every restart. Resources from a file have no creation time:
    namespace and name decide.
    """
    created = resource.metadata.creationTimestamp or ""
    return (created, _namespace(resource), resource.metadata.name)


def _add_users(
    policy: RelayPolicy,
    ref: str,
    secrets: dict[tuple[str, str], Secret],
    users: dict[str, str],
    problems: list[Problem],
) -> None:
    """The users of a policy's Secret; a name another policy defined first keeps that hash."""
    secret = secrets.get((_namespace(policy), ref))
    if secret is None:
        problems.append(_problem(policy, "SecretInvalid", f"users Secret {ref!r} not found"))
        return
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
    resources: Iterable[Resource], revision: int = 0
) -> tuple[RoutingTable, list[Problem]]:
    """Compile resources (with the Secrets they reference) into one routing table."""
    resources = list(resources)
    secrets = {(_namespace(r), r.metadata.name): r for r in resources if isinstance(r, Secret)}
    problems: list[Problem] = []
    routes = sorted(
        (_compile_route(r, secrets, problems) for r in resources if isinstance(r, RelayRoute)),
        key=lambda route: (-route.priority, route.name),
    )
    domains: dict[str, CompiledDomain] = {}
    declared_by: dict[str, RelayDomain] = {}
    for resource in sorted((r for r in resources if isinstance(r, RelayDomain)), key=_precedence):
        if resource.spec.domain in domains:
            problems.append(
                _problem(
                    resource,
                    "Conflict",
                    f"domain {resource.spec.domain!r} is declared by more than one RelayDomain",
                )
            )
            continue
        domains[resource.spec.domain] = _compile_domain(resource, secrets, problems)
        declared_by[resource.spec.domain] = resource
    for domain in domains.values():
        if domain.accept_inbound and not any(
            any(domain_matches(p, domain.domain) for p in route.recipient_domains)
            for route in routes
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
        policy=_compile_policy(policies, secrets, problems),
    )
    return table, problems
