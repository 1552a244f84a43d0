"""Between services: mutual TLS on ingress -> queue gRPC, credentials on NATS, nothing logged."""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from pathlib import Path

import nkeys
import pytest
from kurrier.core.jetstream import connect, disconnect
from kurrier.ingress.queue_client import QueueClient, QueueTls, QueueUnavailable
from kurrier.v1 import queue_pb2

from tests.ingress.smtp_probe import SmtpProbe
from tests.support.certs import Certificates
from tests.support.nats import NatsServer
from tests.support.relay import ServiceRelay, documents, inbound_domain, route
from tests.support.sink import Sink


async def test_nats_nkey_seed_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    config = tmp_path / "nats-auth.conf"
    config.write_text(f"authorization {{ users = [ {{ nkey: {public} }} ] }}\n")
    nats = NatsServer(tmp_path / "store", tmp_path, extra_args=["--config", str(config)])
    nats.start()
    try:
        seed_file = tmp_path / "user.nk"
        seed_file.write_bytes(seed)
        monkeypatch.setenv("KURRIER_NATS_NKEY", str(seed_file))
        nc = await connect(nats.url, "nkey-test")
        try:
            assert nc.is_connected
            await nc.jetstream().account_info()
        finally:
            await disconnect(nc)
    finally:
        nats.stop()


def test_mtls_to_the_queue_and_a_nats_password(tmp_path: Path, sink: Sink) -> None:
    certificates = Certificates(tmp_path / "tls")
    password = secrets.token_urlsafe(16)
    nats = NatsServer(
        tmp_path / "nats-store", tmp_path, extra_args=["--user", "kurrier", "--pass", password]
    )
    nats.start()
    url = f"nats://kurrier:{password}@127.0.0.1:{nats.port}"
    relay = ServiceRelay(
        tmp_path,
        url,
        service_args={
            "queue": [
                "--grpc-tls-cert",
                str(certificates.server_cert),
                "--grpc-tls-key",
                str(certificates.server_key),
                "--grpc-tls-client-ca",
                str(certificates.ca_file),
            ],
            "ingress": [
                "--queue-tls-ca",
                str(certificates.ca_file),
                "--queue-tls-cert",
                str(certificates.client_cert),
                "--queue-tls-key",
                str(certificates.client_key),
                "--queue-tls-server-name",
                "queue.test",
            ],
        },
    )
    marker = uuid.uuid4().hex
    try:
        relay.publish(documents(inbound_domain("example.com"), route("r", ["*"], sink.port)))
        with relay:
            with SmtpProbe(relay.smtp_port) as smtp:
                smtp.reply()
                smtp.command("EHLO probe.test")
                smtp.command("MAIL FROM:<a@client.test>")
                smtp.command("RCPT TO:<user@example.com>")
                assert smtp.command("DATA").code == 354
                smtp.send(f"Subject: {marker}\r\n\r\nover mTLS\r\n.\r\n".encode())
                assert smtp.reply().startswith("250 2.0.0")
            [delivered] = sink.wait_for(1)
            assert marker.encode() in delivered.content

            # A client without a certificate of ours gets nothing stored.
            anonymous = QueueTls(ca_file=str(certificates.ca_file), server_name="queue.test")
            with pytest.raises(QueueUnavailable):
                _enqueue(relay.queue_address, anonymous)
    finally:
        nats.stop()
    for log in tmp_path.glob("*.log"):
        assert password not in log.read_text(errors="replace"), f"NATS password in {log.name}"


def _enqueue(address: str, tls: QueueTls) -> None:
    async def run() -> None:
        client = QueueClient(address, tls)
        try:
            envelope = queue_pb2.Envelope(
                queue_id=uuid.uuid4().hex[:20], mail_from="a@b.test", recipients=["c@d.test"]
            )
            await asyncio.wait_for(client.enqueue(envelope, [b"x\r\n"]), 30)
        finally:
            await client.close()

    asyncio.run(run())
