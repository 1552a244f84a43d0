"""How a delivery process is configured (flags of `kurrier delivery` and `kurrier up`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeliverySettings:
    helo_name: str
    concurrency: int = 32
    smtp_timeout: float = 60.0
    # Postfix's smtp_connect_timeout: an unreachable MX address costs this much.
    connect_timeout: float = 30.0
    tls_ca_file: str | None = None
    dns_resolver: str | None = None  # HOST:PORT; None = the system's resolv.conf
    mx_port: int = 25
