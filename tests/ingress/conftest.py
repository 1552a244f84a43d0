"""A relay set up to be attacked: tight limits, TLS, users, sender rules, a sink behind it.

Every probe connects from its own loopback address (127.0.0.0/8 is all ours),
so per-client limits and rate buckets of one probe never touch another's.
127.0.0.2 is the one trusted network.
"""

from __future__ import annotations

import base64
import itertools
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import argon2
import bcrypt
import pytest

from tests.support.certs import Certificates
from tests.support.nats import NatsServer
from tests.support.processes import free_port
from tests.support.relay import ServiceRelay, documents, inbound_domain, route
from tests.support.sink import Sink

TRUSTED_IP = "127.0.0.2"
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
MAX_MESSAGE_SIZE = 65536
MAX_RECIPIENTS = 5
CONNECTIONS_PER_CLIENT = 3
MESSAGES_PER_CLIENT_MINUTE = 20
MESSAGES_PER_IDENTITY_MINUTE = 10
MAX_CONNECTIONS = 40
AUTH_FAILURES_PER_MINUTE = 3
IDLE_TIMEOUT = 2.0
SESSION_TIMEOUT = 6.0
MAX_HEADERS = 20

_addresses = itertools.count(10)


def fresh_ip() -> str:
    """A loopback address no other probe of this session used."""
    number = next(_addresses)
    return f"127.0.{number // 250}.{number % 250 + 3}"


def users_secret() -> str:
    """alice's password as bcrypt, bob's and carol's as argon2id: both schemes are exercised."""
    hashes = {
        "alice": bcrypt.hashpw(PASSWORDS["alice"].encode(), bcrypt.gensalt(rounds=4)).decode(),
        "bob": argon2.PasswordHasher().hash(PASSWORDS["bob"]),
        "carol": argon2.PasswordHasher().hash(PASSWORDS["carol"]),
    }
    data = "".join(
        f"\n  {user}: {base64.b64encode(value.encode()).decode()}" for user, value in hashes.items()
    )
    return "apiVersion: v1\nkind: Secret\nmetadata: {name: smtp-users}\ndata:" + data


def hostile_policy(**spec: str) -> str:
    extra = "".join(f"\n  {key}: {value}" for key, value in spec.items())
    return (
        textwrap.dedent(f"""\
        apiVersion: kurrier.io/v1alpha1
        kind: RelayPolicy
        metadata: {{name: hostile}}
        spec:
          trustedNetworks: ["{TRUSTED_IP}/32"]
          requireTLSForAuth: true
          auth: {{usersSecretRef: {{name: smtp-users}}}}
          senderRules:
            - {{identity: alice, domains: [alice.test]}}
            - {{identity: bob, domains: [bob.test, "*.bob.test"]}}
            - {{identity: carol, domains: ["*"]}}
          maxMessageSize: {MAX_MESSAGE_SIZE}
          maxRecipients: {MAX_RECIPIENTS}
          maxConnectionsPerClient: {CONNECTIONS_PER_CLIENT}
          rateLimit:
            perClientPerMinute: {MESSAGES_PER_CLIENT_MINUTE}
            perIdentityPerMinute: {MESSAGES_PER_IDENTITY_MINUTE}""")
        + extra
    )


@dataclass
class HostileRelay:
    relay: ServiceRelay
    sink: Sink
    certificates: Certificates
    submission_port: int
    smtps_port: int

    @property
    def smtp_port(self) -> int:
        return self.relay.smtp_port

    @property
    def ingress_log(self) -> Path:
        return self.relay.workdir / "ingress.log"


def ingress_tls_args(certificates: Certificates, submission: int, smtps: int) -> list[str]:
    return [
        "--submission",
        f"127.0.0.1:{submission}",
        "--smtps",
        f"127.0.0.1:{smtps}",
        "--tls-cert",
        str(certificates.server_cert),
        "--tls-key",
        str(certificates.server_key),
    ]


@pytest.fixture(scope="package")
def hostile_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileRelay]:
    workdir = tmp_path_factory.mktemp("hostile")
    certificates = Certificates(workdir / "tls")
    nats = NatsServer(workdir / "nats-store", workdir)
    nats.start()
    submission, smtps = free_port(), free_port()
    limits = [
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--idle-timeout",
        f"{IDLE_TIMEOUT}s",
        "--session-timeout",
        f"{SESSION_TIMEOUT}s",
        "--auth-failures-per-minute",
        str(AUTH_FAILURES_PER_MINUTE),
        "--max-headers",
        str(MAX_HEADERS),
    ]
    relay = ServiceRelay(
        workdir,
        nats.url,
        metrics=True,
        service_args={"ingress": [*ingress_tls_args(certificates, submission, smtps), *limits]},
    )
    try:
        with Sink() as sink:
            relay.publish(
                documents(
                    inbound_domain("example.com"),
                    route("everything", ["*"], sink.port),
                    hostile_policy(),
                    users_secret(),
                )
            )
            with relay:
                yield HostileRelay(relay, sink, certificates, submission, smtps)
    finally:
        nats.stop()
