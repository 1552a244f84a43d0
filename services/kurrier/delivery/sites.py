"""Destination sites: which next hops are one receiver, and the limits it gets by default.

A site is what a receiving organisation counts connections and messages
by. A smarthost is its own site (host and port). For MX routes the site
is the domain's set of MX host names, so domains sharing their MX hosts
share a site; and when an MX host belongs to a big provider (all of
Google's, Microsoft's, Yahoo's, Apple's customers), the provider is one
site, whatever the recipient domain.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from kurrier.core.routing import CompiledRoute
from kurrier.delivery.next_hop import NextHop


@dataclass(frozen=True)
class Provider:
    name: str
    mx_suffixes: tuple[str, ...]
    max_connections: int
    per_minute: int


# Polite to the big mailbox providers when a route says nothing: few
# connections, each carrying many messages, and a steady pace. Each provider
# publishes no number; these are below what their sender guidelines and
# common MTA defaults (KumoMTA's shaping.toml, Postfix's per-destination
# concurrency of 20) tolerate from one sending IP.
PROVIDERS = (
    Provider("google", ("google.com", "googlemail.com"), 10, 600),
    Provider("microsoft", ("outlook.com", "hotmail.com"), 10, 600),
    Provider("yahoo", ("yahoodns.net",), 5, 300),
    Provider("apple", ("icloud.com", "me.com"), 5, 300),
)


@dataclass(frozen=True)
class Site:
    # What the site is called in logs, metrics and `kurrier queue sites`.
    name: str
    max_connections: int | None
    per_minute: int | None

    @property
    def key(self) -> str:
        """The site's name as a NATS KV key can spell it (letters, digits, '-', '_', '.')."""
        return _site_key(self.name)


# A site is made again for every message; its few names are hashed once each.
@functools.lru_cache(maxsize=4096)
def _site_key(name: str) -> str:
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"site-{digest}"


def _provider(host_names: set[str]) -> Provider | None:
    for provider in PROVIDERS:
        for name in host_names:
            if any(name == s or name.endswith(f".{s}") for s in provider.mx_suffixes):
                return provider
    return None


def site_of(route: CompiledRoute, hops: list[NextHop]) -> Site:
    """The site hops belong to, with the route's shaping or else the provider's defaults."""
    host_names = {hop.server_name.lower().rstrip(".") for hop in hops}
    provider = _provider(host_names) if route.mx else None
    if provider is not None:
        name = provider.name
    elif route.smarthost is not None:
        name = f"{route.smarthost[0]}:{route.smarthost[1]}"
    else:
        name = ",".join(sorted(host_names))
    configured = route.site_max_connections is not None or route.site_per_minute is not None
    if configured or provider is None:
        return Site(name, route.site_max_connections, route.site_per_minute)
    return Site(name, provider.max_connections, provider.per_minute)
