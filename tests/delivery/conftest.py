"""Fixtures for delivery: a local authoritative DNS server, a validating resolver on signed
zones (DANE), a test CA, couriers using them, and the shaping bucket of a real nats-server.

Mail hosts are sinks on loopback addresses (127.0.0.2, 127.0.0.3, ::1...),
all on one port, since an MX record names a host and every MX host is
contacted on the same port (`--mx-port`).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from kurrier.core.jetstream import SHAPING_BUCKET, connect, disconnect, ensure_layout, kv_stream
from kurrier.delivery.courier import Courier
from kurrier.delivery.settings import DeliverySettings
from nats.js.kv import KeyValue

from tests.support.certs import TestCA
from tests.support.dns_server import DnsServer
from tests.support.dnssec import ValidatingDns, ZoneKey
from tests.support.nats import NatsServer
from tests.support.processes import free_port

MAIL_HOST_ADDRESSES = (*(f"127.0.0.{n}" for n in range(2, 20)), "::1")


def _bindable(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


@pytest.fixture
def mx_port() -> int:
    """A port free on every loopback address the tests use as a mail host."""
    for _ in range(50):
        port = free_port()
        if all(_bindable(address, port) for address in MAIL_HOST_ADDRESSES):
            return port
    raise AssertionError("no port free on all mail host addresses")


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture
def test_ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


def _courier(resolver: str, test_ca: TestCA, mx_port: int, dane: bool) -> Courier:
    return Courier(
        DeliverySettings(
            helo_name="relay.test",
            smtp_timeout=10,
            connect_timeout=5,
            tls_ca_file=str(test_ca.ca_file),
            dns_resolver=resolver,
            mx_port=mx_port,
            dane=dane,
        )
    )


@pytest.fixture
async def courier(dns_server: DnsServer, test_ca: TestCA, mx_port: int) -> AsyncIterator[Courier]:
    running = _courier(dns_server.address, test_ca, mx_port, dane=False)
    yield running
    await running.pool.close_idle(everything=True)


@pytest.fixture(scope="session")
def zone_key(tmp_path_factory: pytest.TempPathFactory) -> ZoneKey:
    """The signed test zone's key, made once per session."""
    return ZoneKey.generate(tmp_path_factory.mktemp("zone-key"))


@pytest.fixture
def validating_dns(tmp_path: Path, zone_key: ZoneKey) -> ValidatingDns:
    return ValidatingDns(tmp_path / "dnssec", zone_key)


@pytest.fixture
async def dane_courier(
    validating_dns: ValidatingDns, test_ca: TestCA, mx_port: int
) -> AsyncIterator[Courier]:
    """A courier with `--dane on` whose resolver is the test's validating unbound."""
    running = _courier(validating_dns.address, test_ca, mx_port, dane=True)
    yield running
    await running.pool.close_idle(everything=True)


@pytest.fixture
async def dane_off_courier(
    validating_dns: ValidatingDns, test_ca: TestCA, mx_port: int
) -> AsyncIterator[Courier]:
    """The same resolver with `--dane off`: its AD bit is not trusted."""
    running = _courier(validating_dns.address, test_ca, mx_port, dane=False)
    yield running
    await running.pool.close_idle(everything=True)


@pytest.fixture
async def shaping_kv(nats_server: NatsServer) -> AsyncIterator[KeyValue]:
    """The kurrier-shaping bucket of a real nats-server (delivery's cluster-wide slots)."""
    nc = await connect(nats_server.url, "test")
    js = nc.jetstream()
    await ensure_layout(js, streams={kv_stream(SHAPING_BUCKET)})
    yield await js.key_value(SHAPING_BUCKET)
    await disconnect(nc)
