"""Secrets stay secrets: a smarthost password, a DKIM key and a user's password hash are
used (delivery authenticates and signs, ingress checks AUTH) yet appear nowhere else: not
in the routing table in NATS KV as any NATS client reads it, not in any log line, not in
any span, not in `kurrier queue show`."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import textwrap
from pathlib import Path

import bcrypt
import pytest
from kurrier.core.jetstream import CONFIG_BUCKET, ROUTING_TABLE_KEY, connect

from tests.ingress.smtp_probe import SmtpProbe, plain
from tests.support.certs import private_pem, rsa_key, self_signed_context
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.processes import free_port, kurrier_argv, wait_until
from tests.support.relay import (
    UpRelay,
    documents,
    message_records,
    route,
    secret,
    signing_domain,
)
from tests.support.sink import Sink

DEFERRED = "later@example.com"


def _policy() -> str:
    return textwrap.dedent("""\
        apiVersion: kurrier.io/v1alpha1
        kind: RelayPolicy
        metadata: {name: default}
        spec:
          requireTLSForAuth: false
          auth: {usersSecretRef: {name: smtp-users}}""")


async def _stored_table(nats_url: str) -> bytes:
    """The routing table as any NATS client with access to the bucket reads it (here the
    queue's login; its replies come to its own inbox, which kurrier's connect names)."""
    nc = await connect(nats_url, "test-reader")
    try:
        kv = await nc.jetstream().key_value(CONFIG_BUCKET)
        entry = await kv.get(ROUTING_TABLE_KEY)
        assert entry.value is not None
        return entry.value
    finally:
        await nc.close()


def _send(port: int, user: str, password: str, recipient: str) -> str:
    """One message over submission with AUTH; its queue id."""
    with SmtpProbe(port) as smtp:
        assert smtp.reply().code == 220
        assert smtp.command("EHLO client.test").code == 250
        assert smtp.command(plain(user, password)).startswith("235")
        assert smtp.command("MAIL FROM:<app@signed.test>").startswith("250")
        assert smtp.command(f"RCPT TO:<{recipient}>").startswith("250")
        assert smtp.command("DATA").code == 354
        accepted = smtp.command("From: app@signed.test\r\nSubject: hi\r\n\r\nhello\r\n.")
        assert accepted.startswith("250 2.0.0"), accepted.text
    return accepted.lines[-1].rsplit(" ", 1)[-1]


def _deferred(nats_url: str, queue_id: str) -> bool:
    """Whether the queue recorded the message's deferral (what `queue show` prints)."""
    return any(
        r.queue_id == queue_id and any(s.status == "deferred" for s in r.recipients)
        for r in message_records(nats_url)
    )


def test_secrets_are_used_and_shown_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    smarthost_password = secrets.token_urlsafe(24)
    client_password = secrets.token_urlsafe(24)
    password_hash = bcrypt.hashpw(client_password.encode(), bcrypt.gensalt(4)).decode()
    dkim_pem = private_pem(rsa_key()).decode()
    # Any line of the key's body would betray it.
    dkim_lines = [line for line in dkim_pem.splitlines() if "-----" not in line]
    secret_texts = {
        "smarthost password": smarthost_password,
        "password hash": password_hash,
        **{f"DKIM key line {n}": line for n, line in enumerate(dkim_lines)},
    }

    smarthost_users = {"relay": smarthost_password}
    tls = self_signed_context(tmp_path, "127.0.0.1")
    with OtlpReceiver() as receiver, Sink(tls_context=tls, users=smarthost_users) as sink:
        for name, value in {**receiver.env(), "KURRIER_TRACE_ADDRESSES": "true"}.items():
            monkeypatch.setenv(name, value)
        sink.behaviour.rejected[DEFERRED] = "451 4.3.0 try later"
        config = documents(
            route(
                "to-sink", ["*"], sink.port, tls="required", auth="{secretRef: {name: relay-creds}}"
            ),
            secret("relay-creds", username="relay", password=smarthost_password),
            signing_domain("signed.test", "k1", "dkim"),
            secret("dkim", **{"private.pem": dkim_pem}),
            _policy(),
            secret("smtp-users", alice=password_hash),
        )
        submission = free_port()
        with UpRelay(tmp_path, config, "--submission", f"127.0.0.1:{submission}") as relay:
            # Ingress checked the hash, delivery logged in with the password and signed.
            _send(submission, "alice", client_password, "user@example.com")
            [delivered] = sink.wait_for(1)
            assert b"DKIM-Signature:" in delivered.content
            assert delivered.auth_user == "relay"
            held = _send(submission, "alice", client_password, DEFERRED)
            wait_until(lambda: _deferred(relay.nats_url, held), 30, "the deferral to be recorded")

            stored = asyncio.run(_stored_table(relay.nats_url))
            assert b"sealed:v1:delivery:" in stored and b"sealed:v1:ingress:" in stored
            shown = subprocess.run(
                kurrier_argv("queue", "show", held, "--data-dir", str(relay.data_dir)),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert shown.returncode == 0, shown.stderr
            assert "451 4.3.0 try later" in shown.stdout
            spans = receiver.wait_until(
                lambda spans: sum(s.service == "kurrier-delivery" for s in spans) >= 2,
                "delivery's spans of both messages",
            )

    seen = {
        "the routing table in NATS KV": stored.decode(errors="replace"),
        "kurrier queue show": shown.stdout + shown.stderr,
        "the logs": (tmp_path / "up.log").read_text(errors="replace"),
        "the spans": "\n".join(repr(span) for span in spans),
    }
    assert seen["the logs"] and seen["the spans"]
    for where, text in seen.items():
        for what, value in secret_texts.items():
            assert value not in text, f"{what} in {where}"
