"""How a delivery process is configured (flags of `kurrier delivery` and `kurrier up`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kurrier.core.settings import DELIVERY


def _declared(name: str) -> Any:
    """The default kurrier.core.settings declares for the flag (KURRIER_* variables are
    the command line's business), so that in-process tests run with the same settings."""
    [setting] = [s for s in DELIVERY if s.name == name]
    assert isinstance(setting.default, str), setting.name
    return setting.parse(setting.default)


@dataclass(frozen=True)
class DeliverySettings:
    helo_name: str
    concurrency: int = _declared("concurrency")
    smtp_timeout: float = 60.0
    # Postfix's smtp_connect_timeout: an unreachable MX address costs this much.
    connect_timeout: float = 30.0
    # Flags without a default: not set unless given.
    tls_ca_file: str | None = None
    dns_resolver: str | None = None  # HOST:PORT; None = the system's resolv.conf
    mx_port: int = _declared("mx_port")
    # Trust the resolver's AD bit for TLSA records (delivery/dane.py).
    dane: bool = _declared("dane") == "on"
    # Removals of delivered messages' records waiting together share an atomic
    # batch of at least this many (0: off; in-process tests have no NATS client
    # for batches, `kurrier delivery` passes the declared default).
    atomic_batch_min: int = 0
