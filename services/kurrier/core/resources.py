"""Typed models of kurrier's custom resources (group kurrier.io, v1alpha1).

Field names follow the Kubernetes (camelCase) spelling so that a model
validates exactly the YAML a user applies with kubectl. The models are the
single source for the CRD schemas' field set (a test checks they agree).
"""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Annotated, Literal

from kurrier.core.domains import InvalidDomain, normalise_domain
from kurrier.core.durations import parse_duration
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

API_GROUP = "kurrier.io"
API_VERSION = f"{API_GROUP}/v1alpha1"

_K8S_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_domain_pattern(value: str) -> str:
    if value == "*":
        return value
    prefix = "*." if value.startswith("*.") else ""
    try:
        return prefix + normalise_domain(value.removeprefix("*."))
    except InvalidDomain as error:
        raise ValueError(
            f"{value!r} is not a domain pattern (use 'example.com', '*.example.com' or '*'): "
            f"{error}"
        ) from None


class ObjectMeta(_Model):
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    namespace: str | None = None
    generation: int | None = None
    # RFC 3339 in UTC as the API server writes it, so the text sorts by time.
    creationTimestamp: str | None = None

    @field_validator("name")
    @classmethod
    def _name_is_dns_subdomain(cls, value: str) -> str:
        if not _K8S_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid Kubernetes object name")
        return value


class SecretRef(_Model):
    name: str = Field(min_length=1)


class SecretKeyRef(_Model):
    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


DkimSelector = Annotated[
    str, Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
MAX_DKIM_KEYS = 4


class DkimKey(_Model):
    selector: DkimSelector
    secretRef: SecretKeyRef


class DkimSpec(_Model):
    """One key (selector, secretRef) or several (keys), e.g. RSA and Ed25519 side by side."""

    selector: DkimSelector | None = None
    secretRef: SecretKeyRef | None = None
    keys: list[DkimKey] | None = Field(default=None, min_length=1, max_length=MAX_DKIM_KEYS)

    @model_validator(mode="after")
    def _one_form(self) -> DkimSpec:
        single = self.selector is not None or self.secretRef is not None
        if single == (self.keys is not None):
            raise ValueError("set either 'selector' and 'secretRef', or 'keys'")
        if single and (self.selector is None or self.secretRef is None):
            raise ValueError("'selector' and 'secretRef' go together")
        selectors = [key.selector for key in self.keys or ()]
        if len(set(selectors)) != len(selectors):
            raise ValueError("each of 'keys' needs its own selector")
        return self

    @property
    def signing_keys(self) -> tuple[DkimKey, ...]:
        """The keys in the order their signatures go on the message."""
        if self.keys is not None:
            return tuple(self.keys)
        assert self.selector is not None and self.secretRef is not None
        return (DkimKey(selector=self.selector, secretRef=self.secretRef),)


# A mailbox's local part as a recipients list names it (RFC 5321 4.5.3.1.1: 64 octets).
LOCAL_PART_RE = r"^[^\s@]{1,64}$"
MAX_RECIPIENTS_LISTED = 100_000


class RelayDomainSpec(_Model):
    domain: str
    acceptInbound: bool = False
    dkim: DkimSpec | None = None
    # The domain's mailboxes, by local part; None: any local part is taken.
    recipients: list[Annotated[str, Field(pattern=LOCAL_PART_RE)]] | None = Field(
        default=None, max_length=MAX_RECIPIENTS_LISTED
    )

    _domain = field_validator("domain")(normalise_domain)


class SmarthostDestination(_Model):
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=25, ge=1, le=65535)

    @field_validator("host")
    @classmethod
    def _address_or_name(cls, value: str) -> str:
        # A name is resolved and its certificate checked as A-labels: normalised like
        # every domain, not by the resolver's IDNA 2003 (straße is not strasse).
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return normalise_domain(value)
        return value


class MxDestination(_Model):
    pass


class Destination(_Model):
    smarthost: SmarthostDestination | None = None
    mx: MxDestination | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Destination:
        if (self.smarthost is None) == (self.mx is None):
            raise ValueError("exactly one of 'smarthost' or 'mx' must be set")
        return self


TlsMode = Literal["none", "opportunistic", "required", "verify"]


class TlsSpec(_Model):
    mode: TlsMode = "opportunistic"


class RouteAuth(_Model):
    secretRef: SecretRef


class RouteMatch(_Model):
    recipientDomains: list[str] = Field(min_length=1)
    senderDomains: list[str] = Field(default_factory=list)

    _patterns = field_validator("recipientDomains", "senderDomains")(
        lambda values: [_check_domain_pattern(value) for value in values]
    )


class RouteRateLimit(_Model):
    """Transactions a route starts per minute, counted by each delivery process."""

    perMinute: int = Field(ge=1, le=100000)


class RouteShaping(_Model):
    """Limits per destination site (delivery/sites.py) that hold across every
    delivery process together; each is off when left out."""

    maxConnections: int | None = Field(default=None, ge=1, le=10000)
    messagesPerMinute: int | None = Field(default=None, ge=1, le=1000000)

    @model_validator(mode="after")
    def _limits_something(self) -> RouteShaping:
        if self.maxConnections is None and self.messagesPerMinute is None:
            raise ValueError("set maxConnections, messagesPerMinute or both")
        return self


class RelayRouteSpec(_Model):
    priority: int = 0
    match: RouteMatch
    destination: Destination
    tls: TlsSpec = TlsSpec()
    auth: RouteAuth | None = None
    maxConnections: int = Field(default=10, ge=1, le=1000)
    rateLimit: RouteRateLimit | None = None
    shaping: RouteShaping | None = None

    @model_validator(mode="after")
    def _auth_only_to_a_smarthost_over_tls(self) -> RelayRouteSpec:
        # Credentials go to the one host the user named, and never in clear text.
        if self.auth is not None and self.destination.smarthost is None:
            raise ValueError("'auth' needs a 'smarthost' destination (MX hosts get no credentials)")
        if self.auth is not None and self.tls.mode == "none":
            raise ValueError("'auth' needs TLS: tls.mode 'none' would send the password in clear")
        return self


class PolicyAuth(_Model):
    usersSecretRef: SecretRef | None = None
    serviceAccountAudience: str | None = None


class SenderRule(_Model):
    identity: str = Field(min_length=1)
    domains: list[str] = Field(min_length=1)

    _patterns = field_validator("domains")(
        lambda values: [_check_domain_pattern(value) for value in values]
    )


class RateLimit(_Model):
    """Messages (MAIL commands) per minute, a token bucket per client IP and per identity,
    each shared by every ingress replica (core/cluster_counters.py)."""

    perClientPerMinute: int | None = Field(default=None, ge=1)
    perIdentityPerMinute: int | None = Field(default=None, ge=1)


class NamespaceQuota(_Model):
    """How much mail one tenant namespace may send, counted at RCPT across all ingress
    replicas (core/cluster_counters.py); honoured from the platform namespace's policies."""

    namespace: str = Field(min_length=1, max_length=63)  # or "*": every tenant not named
    messagesPerMinute: int | None = Field(default=None, ge=1)
    messagesPerDay: int | None = Field(default=None, ge=1)
    recipientsPerMinute: int | None = Field(default=None, ge=1)
    recipientsPerDay: int | None = Field(default=None, ge=1)


# Who gets delivery status notifications for mail from a client that neither
# authenticated nor is in trustedNetworks (queue/notice_policy.py): nobody, only
# senders in a RelayDomain, or every sender. Strictest first.
BounceScope = Literal["none", "relayDomains", "all"]
BOUNCE_SCOPES: tuple[BounceScope, ...] = ("none", "relayDomains", "all")


class RelayPolicySpec(_Model):
    trustedNetworks: list[str] = Field(default_factory=list)
    requireTLSForAuth: bool = True
    auth: PolicyAuth | None = None
    senderRules: list[SenderRule] = Field(default_factory=list)
    maxMessageSize: int = Field(default=26214400, ge=1024)
    maxRecipients: int = Field(default=100, ge=1)
    # Counted across all ingress replicas (ingress/connection_gate.py).
    maxConnectionsPerClient: int = Field(default=20, ge=1)
    rateLimit: RateLimit | None = None
    namespaceQuotas: list[NamespaceQuota] = Field(default_factory=list)
    # Trusted networks are exempt from the per-client limits (connections, message
    # rate) unless this is true, as Postfix exempts $mynetworks.
    limitTrustedNetworks: bool = False
    bounceUnauthenticated: BounceScope = "relayDomains"
    # A duration such as "4h" (core/durations.py); "0s" sends no delay warnings.
    # Unset, the queue's --delay-warning-time applies.
    delayWarningTime: str | None = Field(default=None, max_length=32)

    @field_validator("delayWarningTime")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @field_validator("trustedNetworks")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        checked = []
        for value in values:
            try:
                checked.append(str(ipaddress.ip_network(value, strict=False)))
            except ValueError:
                raise ValueError(f"{value!r} is not an IP network in CIDR notation") from None
        return checked


class RelayDomain(_Model):
    apiVersion: Literal["kurrier.io/v1alpha1"]
    kind: Literal["RelayDomain"]
    metadata: ObjectMeta
    spec: RelayDomainSpec


class RelayRoute(_Model):
    apiVersion: Literal["kurrier.io/v1alpha1"]
    kind: Literal["RelayRoute"]
    metadata: ObjectMeta
    spec: RelayRouteSpec


class RelayPolicy(_Model):
    apiVersion: Literal["kurrier.io/v1alpha1"]
    kind: Literal["RelayPolicy"]
    metadata: ObjectMeta
    spec: RelayPolicySpec


class Secret(_Model):
    """A core/v1 Secret, as referenced by the kinds above."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    apiVersion: Literal["v1"]
    kind: Literal["Secret"]
    metadata: ObjectMeta
    type: str = "Opaque"
    data: dict[str, str] = Field(default_factory=dict)
    stringData: dict[str, str] = Field(default_factory=dict)

    def value(self, key: str) -> bytes | None:
        """The decoded value under key; stringData wins, as in the API server."""
        if key in self.stringData:
            return self.stringData[key].encode()
        if key in self.data:
            return base64.b64decode(self.data[key], validate=True)
        return None

    @field_validator("data")
    @classmethod
    def _base64(cls, values: dict[str, str]) -> dict[str, str]:
        for key, value in values.items():
            try:
                base64.b64decode(value, validate=True)
            except ValueError:
                raise ValueError(f"data.{key} is not valid base64") from None
        return values


Resource = Annotated[RelayDomain | RelayRoute | RelayPolicy | Secret, Field(discriminator="kind")]
KINDS = ("RelayDomain", "RelayRoute", "RelayPolicy", "Secret")
