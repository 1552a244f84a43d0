"""Limits that hold for the cluster: three ingress processes, one real NATS, one client.

Every probe connects from its own loopback address (tests/ingress/conftest.py),
so each test's client starts with full buckets and no connections.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from kurrier.core.cluster_counters import HOLD, LEASE

from tests.ingress.conftest import TRUSTED_IP, fresh_ip
from tests.ingress.smtp_probe import SmtpProbe
from tests.support.nats import NatsServer
from tests.support.processes import wait_until
from tests.support.relay import ServiceRelay, documents

MESSAGES_PER_CLIENT_MINUTE = 30
CONNECTIONS_PER_CLIENT = 3
POLICY = f"""\
apiVersion: kurrier.io/v1alpha1
kind: RelayPolicy
metadata: {{name: default}}
spec:
  trustedNetworks: ["{TRUSTED_IP}/32"]
  maxConnectionsPerClient: {CONNECTIONS_PER_CLIENT}
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
    """Three ingress processes on one NATS, as three replicas of one Deployment. Connect
    and MAIL are where these limits are spent, so no queue runs behind them."""
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


def _greeted(port: int, ip: str) -> SmtpProbe:
    smtp = SmtpProbe(port, ip)
    assert smtp.reply().code == 220
    return smtp


def _greeting(port: int, ip: str) -> str:
    with SmtpProbe(port, ip) as smtp:
        return smtp.reply().lines[-1]


def _mails(smtp: SmtpProbe, attempts: int) -> list[str]:
    """MAIL (then RSET) attempts times: each MAIL's reply."""
    replies = []
    for _ in range(attempts):
        reply = smtp.command("MAIL FROM:<a@client.test>")
        replies.append(reply.lines[-1])
        if reply.code == 250:
            smtp.command("RSET")
    return replies


def _session_mails(port: int, ip: str, attempts: int) -> list[str]:
    with _greeted(port, ip) as smtp:
        smtp.command("EHLO probe.test")
        return _mails(smtp, attempts)


def _first_mail(port: int, ip: str) -> str:
    """A new session's MAIL reply, or its greeting when that was not 220."""
    with SmtpProbe(port, ip) as smtp:
        greeting = smtp.reply()
        if greeting.code != 220:
            return greeting.lines[-1]
        smtp.command("EHLO probe.test")
        return _mails(smtp, 1)[0]


def test_three_replicas_share_one_client_rate(replicas: Replicas) -> None:
    # Each replica alone would take the whole rate: three times it in total.
    ip = fresh_ip()
    started = time.monotonic()
    with ThreadPoolExecutor(len(replicas.ports)) as pool:
        sessions = pool.map(
            lambda port: _session_mails(port, ip, MESSAGES_PER_CLIENT_MINUTE), replicas.ports
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


def test_three_replicas_share_one_client_connection_cap(replicas: Replicas) -> None:
    # One connection on each replica is the client's whole cap: each replica
    # alone would take three.
    ip = fresh_ip()
    first, *others = replicas.ports
    with ExitStack() as stack:
        held = [stack.enter_context(_greeted(port, ip)) for port in [first, *others]]
        assert _greeting(first, ip).startswith("421 4.7.0")
        assert _greeting(first, fresh_ip()).startswith("220"), "other clients are not affected"
        held.pop().__exit__()
        wait_until(lambda: _greeting(first, ip).startswith("220"), 10, "the slot to free up")


def test_a_killed_replicas_connections_free_up(replicas: Replicas) -> None:
    ip = fresh_ip()
    name = replicas.relay.ingress_names[-1]
    first, victim = replicas.ports[0], replicas.relay.smtp_ports[name]
    with ExitStack() as stack:
        for _ in range(CONNECTIONS_PER_CLIENT):
            stack.enter_context(_greeted(victim, ip))
        assert _greeting(first, ip).startswith("421 4.7.0")
        replicas.relay.processes[name].kill()  # no release written: only the lease ends
        replicas.relay.processes[name].wait()
    try:
        wait_until(
            lambda: _greeting(first, ip).startswith("220"),
            LEASE + 15,
            "the killed replica's share of the client's connections to lapse",
        )
    finally:
        replicas.relay.start(name)


def test_without_nats_limited_clients_are_refused_and_trusted_ones_relay(
    replicas: Replicas,
) -> None:
    port = replicas.ports[0]
    with _greeted(port, fresh_ip()) as before:
        before.command("EHLO probe.test")
        replicas.nats.stop()
        try:
            [reply] = _mails(before, 1)
            assert reply.startswith("451 4.3.0"), reply
            assert _first_mail(port, fresh_ip()).startswith("421 4.3.0")
            assert _first_mail(port, TRUSTED_IP).startswith("250"), "trusted networks are exempt"
        finally:
            replicas.nats.start()
    # A single NATS forgets its memory streams: the limits' bucket is made again.
    wait_until(
        lambda: _first_mail(port, fresh_ip()).startswith("250"), 30, "limited clients to relay"
    )
