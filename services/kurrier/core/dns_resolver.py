"""The one DNS resolver a process asks: the system's, or the `--dns-resolver` HOST:PORT."""

from __future__ import annotations

import logging

import dns.asyncresolver
import dns.resolver
from kurrier.core.addresses import parse_host_port

log = logging.getLogger(__name__)


def dns_resolver(address: str | None, timeout: float) -> dns.asyncresolver.Resolver:
    """A caching resolver: answers are kept for their TTL, negative ones too."""
    if address is None:
        try:
            resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
        except dns.resolver.NoResolverConfiguration:
            # Lookups will fail, each saying why; what needs no DNS goes on.
            log.warning("no resolver configured (/etc/resolv.conf); DNS lookups will fail")
            resolver = dns.asyncresolver.Resolver(configure=False)
    else:
        host, port = parse_host_port(address, default_host="127.0.0.1")
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = port
    resolver.lifetime = timeout
    resolver.cache = dns.resolver.LRUCache(max_size=10000)
    return resolver
