"""Who may open an SMTP session: connections per client and in total, and the drain.

A client is its IPv4 address, or the /64 of an IPv6 address (one host's usual
share), so a single machine cannot take every slot by cycling addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter

SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TOO_MANY_TOTAL = "421 4.3.2 Too many connections, try again later"
TOO_MANY_FROM_CLIENT = "421 4.7.0 Too many connections from your address, try again later"


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
    def __init__(self, max_total: int) -> None:
        self._max_total = max_total
        self._open: Counter[str] = Counter()
        self._total = 0
        self.draining = False
        self.emptied = asyncio.Event()
        self.emptied.set()

    @property
    def open_connections(self) -> int:
        return self._total

    def admit(self, ip: str, max_per_client: int | None) -> str | None:
        """None and the connection is counted, or the 421 that turns it away.

        max_per_client None: no per-client limit (the total still applies)."""
        if self.draining:
            return SHUTTING_DOWN
        if self._total >= self._max_total:
            return TOO_MANY_TOTAL
        key = client_key(ip)
        if max_per_client is not None and self._open[key] >= max_per_client:
            return TOO_MANY_FROM_CLIENT
        self._open[key] += 1
        self._total += 1
        self.emptied.clear()
        return None

    def release(self, ip: str) -> None:
        key = client_key(ip)
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]
        self._total -= 1
        if self._total == 0:
            self.emptied.set()
