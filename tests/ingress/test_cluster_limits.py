"""Limits that hold for the cluster: three ingress processes, one real NATS, one client.

Every probe connects from its own loopback address (tests/ingress/conftest.py),
so each test's client starts with full buckets.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from kurrier.core.cluster_counters import HOLD

from tests.ingress.conftest import TRUSTED_IP, fresh_ip
from tests.ingress.smtp_probe import SmtpProbe
from tests.support.nats import NatsServer
from tests.support.processes import wait_until
from tests.support.relay import ServiceRelay, documents

MESSAGES_PER_CLIENT_MINUTE = 30
POLICY = f"""\
apiVersion: kurrier.io/v1alpha1
kind: RelayPolicy
metadata: {{name: default}}
spec:
  trustedNetworks: ["{TRUSTED_IP}/32"]
  rateLimit: {{perClientPerMinute: {MESSAGES_PER_CLIENT_MINUTE}}}"""


@dataclass
class Replicas:
    nats: NatsServer
    relay: ServiceRelay

    @property
    def ports(self) -> list[int]:
        return list(self.relay.smtp_ports.values())


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Three ingress processes on one NATS, as three replicas of one Deployment. MAIL is
    where the rates are spent, so no queue runs behind them."""
    workdir = tmp_path_factory.mktemp("replicas")
    nats = NatsServer(workdir, workdir)
    nats.start()
    relay = ServiceRelay(workdir, nats.url, ingresses=3)
    try:
        relay.publish(documents(POLICY))
        for name in relay.ingress_names:
            relay.start(name)
        yield Replicas(nats, relay)
    finally:
        relay.__exit__()
        nats.stop()


def _mail(port: int, ip: str, attempts: int) -> list[str]:
    """MAIL (then RSET) attempts times in one session: each MAIL's reply."""
    with SmtpProbe(port, ip) as smtp:
        assert smtp.reply().code == 220
        smtp.command("EHLO probe.test")
        replies = []
        for _ in range(attempts):
            reply = smtp.command("MAIL FROM:<a@client.test>")
            replies.append(reply.lines[-1])
            if reply.code == 250:
                smtp.command("RSET")
        return replies


def test_three_replicas_share_one_client_rate(replicas: Replicas) -> None:
    # Each replica alone would take the whole rate: three times it in total.
    ip = fresh_ip()
    started = time.monotonic()
    with ThreadPoolExecutor(len(replicas.ports)) as pool:
        sessions = pool.map(
            lambda port: _mail(port, ip, MESSAGES_PER_CLIENT_MINUTE), replicas.ports
        )
        replies = [reply for session in sessions for reply in session]
    # The documented bound (core/cluster_counters.py): the burst, the refill over
    # the run, and HOLD seconds' refill; a slow run widens it rather than failing.
    seconds = time.monotonic() - started + HOLD
    bound = MESSAGES_PER_CLIENT_MINUTE * (1 + seconds / 60)
    accepted = sum(reply.startswith("250") for reply in replies)
    refusals = {reply for reply in replies if not reply.startswith("250")}
    assert MESSAGES_PER_CLIENT_MINUTE <= accepted <= bound, (accepted, refusals)
    assert all(r.startswith("450 4.7.1") for r in refusals), refusals


def test_without_nats_limited_clients_get_451_and_trusted_ones_relay(replicas: Replicas) -> None:
    port = replicas.ports[0]
    replicas.nats.stop()
    try:
        [reply] = _mail(port, fresh_ip(), 1)
        assert reply.startswith("451 4.3.0"), reply
        [reply] = _mail(port, TRUSTED_IP, 1)
        assert reply.startswith("250"), "trusted networks are exempt, as from the limit"
    finally:
        replicas.nats.start()
    # A single NATS forgets its memory streams: the limits' bucket is made again.
    wait_until(
        lambda: _mail(port, fresh_ip(), 1)[0].startswith("250"), 30, "limited clients to relay"
    )
