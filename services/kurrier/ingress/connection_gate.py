"""Who may open an SMTP session: connections per client and in total, and the drain.

A client is its IPv4 address, or the /64 of an IPv6 address (one host's usual
share), so a single machine cannot take every slot by cycling addresses.
The total is this process's (file descriptors and memory are); a client's
connections are counted across all ingress replicas (core/cluster_counters.py).
"""

from __future__ import annotations

import asyncio
import ipaddress

from kurrier.core.cluster_counters import ClusterLeases, CountersUnavailable

SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TOO_MANY_TOTAL = "421 4.3.2 Too many connections, try again later"
TOO_MANY_FROM_CLIENT = "421 4.7.0 Too many connections from your address, try again later"
# Failing closed: without NATS nobody knows how many the client holds elsewhere.
CLIENT_LIMIT_UNAVAILABLE = "421 4.3.0 Connection limits cannot be checked now, try again later"


def client_key(ip: str) -> str:
    """The key limits count a client by."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ConnectionGate:
    def __init__(self, max_total: int, clients: ClusterLeases) -> None:
        self._max_total = max_total
        self._clients = clients
        self._total = 0
        self.draining = False
        self.emptied = asyncio.Event()
        self.emptied.set()

    @property
    def open_connections(self) -> int:
        return self._total

    def admit(self) -> str | None:
        """None and the connection is counted in this process's total, or the 421 that
        turns it away."""
        if self.draining:
            return SHUTTING_DOWN
        if self._total >= self._max_total:
            return TOO_MANY_TOTAL
        self._total += 1
        self.emptied.clear()
        return None

    def release(self) -> None:
        self._total -= 1
        if self._total == 0:
            self.emptied.set()

    async def admit_client(self, ip: str, max_per_client: int) -> str | None:
        """None and the connection is counted as its client's, cluster-wide, or the 421."""
        try:
            admitted = await self._clients.acquire(client_key(ip), max_per_client)
        except CountersUnavailable:
            return CLIENT_LIMIT_UNAVAILABLE
        return None if admitted else TOO_MANY_FROM_CLIENT

    def release_client(self, ip: str) -> None:
        self._clients.release(client_key(ip))
