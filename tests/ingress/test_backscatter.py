"""Notifications for mail from clients that proved nothing: RelayPolicy bounceUnauthenticated.

Any client may give any MAIL FROM. When the relay takes a message for an
inbound domain and the next hop then refuses it, a notification would carry
the client's text to that address: backscatter. One `kurrier up` takes every
case on real sockets; its next hop, a sink, refuses gone@in.test and takes
everything else, notifications included. The policy changes in place
(SIGHUP), so the queue decides by the policy at the time of the bounce.
"""

from __future__ import annotations

import signal
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ingress.conftest import PASSWORDS, TRUSTED_IP, fresh_ip, users_secret
from tests.ingress.smtp_probe import SmtpProbe, plain
from tests.support.processes import free_port, wait_until
from tests.support.relay import UpRelay, documents, inbound_domain, message_records, route
from tests.support.sink import Received, Sink

GONE = "gone@in.test"
OUTSIDE = "victim@outside.test"  # an address the client never proved to own
OWN = "user@in.test"  # at one of the relay's domains


def _config(sink: Sink, scope: str | None) -> str:
    policy = textwrap.dedent(f"""\
        apiVersion: kurrier.io/v1alpha1
        kind: RelayPolicy
        metadata: {{name: default}}
        spec:
          trustedNetworks: ["{TRUSTED_IP}/32"]
          requireTLSForAuth: false
          auth: {{usersSecretRef: {{name: smtp-users}}}}""")
    if scope is not None:
        policy += f"\n  bounceUnauthenticated: {scope}"
    return documents(
        inbound_domain("in.test"), route("everything", ["*"], sink.port), policy, users_secret()
    )


@dataclass
class Relay:
    up: UpRelay
    sink: Sink
    submission_port: int
    scope: str | None = None

    def use(self, scope: str | None) -> None:
        """Publish the policy with this bounceUnauthenticated, and wait until the queue has it."""
        if scope == self.scope:
            return
        revision = self.up.table_revision_in_use("queue")
        self.up.config.write_text(_config(self.sink, scope))
        assert self.up.process is not None
        self.up.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: self.up.table_revision_in_use("queue") > revision, 30, "the queue's new table"
        )
        self.scope = scope


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    workdir: Path = tmp_path_factory.mktemp("backscatter")
    submission = free_port()
    with Sink() as sink:
        sink.behaviour.rejected[GONE] = "550 5.1.1 <gone@in.test>: user unknown"
        config = _config(sink, None)
        with UpRelay(workdir, config, "--submission", f"127.0.0.1:{submission}") as up:
            yield Relay(up, sink, submission)


def _send(
    relay: Relay, client: str, sender: str, rcpt: str = f"RCPT TO:<{GONE}>"
) -> tuple[str, list[Received]]:
    """Send a message (by default one the next hop refuses): its queue id, and the
    notifications of it that reached sender."""
    marker = uuid.uuid4().hex
    port = relay.submission_port if client == "authenticated" else relay.up.smtp_port
    source = TRUSTED_IP if client == "trusted" else fresh_ip()
    with SmtpProbe(port, source) as smtp:
        assert smtp.reply().code == 220
        assert smtp.command("EHLO client.test").code == 250
        if client == "authenticated":
            assert smtp.command(plain("alice", PASSWORDS["alice"])).startswith("235")
        assert smtp.command(f"MAIL FROM:<{sender}>").startswith("250")
        assert smtp.command(rcpt).startswith("250")
        assert smtp.command("DATA").code == 354
        accepted = smtp.command(f"Subject: {marker}\r\n\r\nclick here\r\n.")
        assert accepted.startswith("250 2.0.0"), accepted.text
    queue_id = accepted.lines[-1].rsplit(" ", 1)[-1]

    # A notification is stored before the message's record goes, and its queue
    # id starts with the message's: once none is left, any was delivered.
    def settled() -> bool:
        return not any(r.queue_id.startswith(queue_id) for r in message_records(relay.up.nats_url))

    wait_until(settled, 60, "the message settled and any notification delivered")
    notices = [
        m for m in relay.sink.messages if marker.encode() in m.content and m.mail_from == "<>"
    ]
    assert all(m.recipients == (sender,) for m in notices), notices
    return queue_id, notices


CASES = [
    # scope (None: not set, the default relayDomains), client, sender, notified
    (None, "untrusted", OUTSIDE, False),
    (None, "untrusted", OWN, True),
    (None, "authenticated", OUTSIDE, True),
    (None, "trusted", OUTSIDE, True),
    ("all", "untrusted", OUTSIDE, True),
    ("none", "untrusted", OWN, False),
    ("none", "authenticated", OUTSIDE, True),
]


@pytest.mark.parametrize(
    ("scope", "client", "sender", "notified"),
    CASES,
    ids=[f"{scope or 'default'}-{client}-{sender}" for scope, client, sender, _ in CASES],
)
def test_notification_by_client_and_policy(
    relay: Relay, scope: str | None, client: str, sender: str, notified: bool
) -> None:
    relay.use(scope)
    queue_id, notices = _send(relay, client, sender)
    assert len(notices) == (1 if notified else 0), notices
    if notified:
        assert notices[0].mail_from == "<>"
        assert b"550 5.1.1 <gone@in.test>: user unknown" in notices[0].content
    else:
        log = (relay.up.workdir / "up.log").read_text(errors="replace").splitlines()
        assert any(f"no notification to <{sender}>" in line and queue_id in line for line in log)


@pytest.mark.parametrize(("scope", "notified"), [(None, False), ("all", True)])
def test_a_success_notice_an_unproven_client_asks_for(
    relay: Relay, scope: str | None, notified: bool
) -> None:
    """NOTIFY=SUCCESS (RFC 3461) to a next hop without DSN makes a "relayed" notice,
    with the message's headers, to MAIL FROM: the same rule holds for it."""
    relay.use(scope)
    _, notices = _send(relay, "untrusted", OUTSIDE, "RCPT TO:<ok@in.test> NOTIFY=SUCCESS")
    assert len(notices) == (1 if notified else 0), notices
    if notified:
        assert b"Action: relayed" in notices[0].content
