"""Between services: mutual TLS on ingress and the admin CLI -> queue gRPC, credentials
on NATS, nothing logged."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import uuid
from pathlib import Path

import grpc
import nkeys
import pytest
from kurrier.core.grpc_tls import INGRESS_IDENTITY, QueueTls, queue_channel
from kurrier.core.jetstream import connect, disconnect
from kurrier.v1 import queue_pb2, queue_pb2_grpc

from tests.ingress.smtp_probe import Reply, SmtpProbe
from tests.support.certs import Certificates, TestCA
from tests.support.nats import NatsServer
from tests.support.processes import kurrier_argv, stop_process, wait_until
from tests.support.relay import ServiceRelay, UpRelay, documents, inbound_domain, route
from tests.support.sink import Sink

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


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

            # Only a client with a certificate from the queue's client CA gets an answer:
            # not one in plaintext, nor one without a certificate, nor one whose
            # certificate another CA signed.
            ca, name = str(certificates.ca_file), "queue.test"
            stranger = TestCA(tmp_path / "stranger")
            foreign_cert, foreign_key = stranger.issue("ingress.test", client=True)
            refused = {
                "plaintext": None,
                "no certificate": QueueTls(ca, server_name=name),
                "another CA's certificate": QueueTls(ca, str(foreign_cert), str(foreign_key), name),
            }
            for what, tls in refused.items():
                assert _list_status(relay.queue_address, tls) == UNAVAILABLE, what
            admin_flags = ["--queue-tls-ca", ca, "--queue-tls-server-name", name]
            assert _admin(relay.queue_address, *admin_flags).returncode == 1
            admin_flags += [
                "--queue-tls-cert",
                str(certificates.admin_cert),
                "--queue-tls-key",
                str(certificates.admin_key),
            ]
            listed = _admin(relay.queue_address, *admin_flags)
            assert listed.returncode == 0, listed.stderr
            assert listed.stdout.strip() == "Mail queue is empty"
            foreign = [*admin_flags[:4], "--queue-tls-cert", str(foreign_cert)]
            foreign += ["--queue-tls-key", str(foreign_key)]
            refusal = _admin(relay.queue_address, *foreign)
            assert refusal.returncode == 1
            assert "cannot reach the queue" in refusal.stderr
    finally:
        nats.stop()
    for log in tmp_path.glob("*.log"):
        assert password not in log.read_text(errors="replace"), f"NATS password in {log.name}"


def test_kurrier_up_runs_its_queue_behind_mutual_tls(tmp_path: Path, sink: Sink) -> None:
    """`kurrier up` makes a CA of its own: its children and `kurrier queue --data-dir`
    use it, a plaintext client of the queue's socket gets nothing, and ingress's
    certificate may enqueue but not read the queue."""
    config = documents(inbound_domain("example.com"), route("to-sink", ["example.com"], sink.port))
    with UpRelay(tmp_path, config) as relay:
        address = str(relay.state["queue_address"])
        assert _list_status(address, None) == UNAVAILABLE
        with SmtpProbe(relay.smtp_port) as smtp:
            smtp.reply()
            smtp.command("EHLO probe.test")
            smtp.command("MAIL FROM:<a@client.test>")
            smtp.command("RCPT TO:<user@example.com>")
            assert smtp.command("DATA").code == 354
            smtp.send(b"Subject: through up\r\n\r\nover mTLS\r\n.\r\n")
            assert smtp.reply().startswith("250 2.0.0")
        sink.wait_for(1)
        listed = subprocess.run(
            kurrier_argv("queue", "list", "--data-dir", str(relay.data_dir)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        tls = relay.data_dir / "tls"
        ingress = QueueTls(
            str(tls / "ca.crt"),
            str(tls / f"{INGRESS_IDENTITY}.crt"),
            str(tls / f"{INGRESS_IDENTITY}.key"),
            "localhost",
        )
        assert _list_status(address, ingress) == grpc.StatusCode.PERMISSION_DENIED


def _list_status(address: str, tls: QueueTls | None) -> grpc.StatusCode:
    """The status of one admin call (ListMessages) to the queue with this client's TLS."""

    async def call() -> grpc.StatusCode:
        async with queue_channel(address, tls) as channel:
            stub = queue_pb2_grpc.QueueServiceStub(channel)
            try:
                await stub.ListMessages(queue_pb2.ListMessagesRequest(), timeout=15)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

    return asyncio.run(call())


def _admin(address: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kurrier_argv("queue", "list", "--queue-address", address, *flags),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _sent_over_mtls(relay: ServiceRelay, marker: str) -> Reply:
    """The reply to a message's end of data (250 once the queue stored it)."""
    with SmtpProbe(relay.smtp_port) as smtp:
        smtp.reply()
        smtp.command("EHLO probe.test")
        smtp.command("MAIL FROM:<a@client.test>")
        smtp.command("RCPT TO:<user@example.com>")
        assert smtp.command("DATA").code == 354
        smtp.send(f"Subject: {marker}\r\n\r\nover mTLS\r\n.\r\n".encode())
        return smtp.reply()


def test_ingress_takes_a_renewed_client_certificate_without_a_restart(
    tmp_path: Path, sink: Sink, nats_server: NatsServer
) -> None:
    """The CA is rotated: the queue trusts only the new one, and is restarted, so ingress
    must connect afresh. It gets through only with the renewed certificate from its files."""
    certificates = Certificates(tmp_path / "tls")
    mine = tmp_path / "mounted"  # as a Secret's files: replaced by a renewal
    mine.mkdir()
    for name, source in {
        "ingress.crt": certificates.client_cert,
        "ingress.key": certificates.client_key,
        "client-ca.crt": certificates.ca_file,
    }.items():
        shutil.copy(source, mine / name)
    relay = ServiceRelay(
        tmp_path,
        nats_server.url,
        service_args={
            "queue": [
                *("--grpc-tls-cert", str(certificates.server_cert)),
                *("--grpc-tls-key", str(certificates.server_key)),
                *("--grpc-tls-client-ca", str(mine / "client-ca.crt")),
            ],
            "ingress": [
                *("--queue-tls-ca", str(certificates.ca_file)),
                *("--queue-tls-cert", str(mine / "ingress.crt")),
                *("--queue-tls-key", str(mine / "ingress.key")),
                *("--queue-tls-server-name", "queue.test"),
            ],
        },
    )
    relay.publish(documents(inbound_domain("example.com"), route("r", ["*"], sink.port)))
    with relay:
        assert _sent_over_mtls(relay, "before").startswith("250 2.0.0")
        rotated = TestCA(tmp_path / "rotated")
        cert, key = rotated.issue(INGRESS_IDENTITY, client=True)
        shutil.copy(rotated.ca_file, mine / "client-ca.crt")
        shutil.copy(cert, mine / "ingress.crt")
        shutil.copy(key, mine / "ingress.key")
        wait_until(
            lambda: (
                f"TLS certificate reloaded from {mine / 'ingress.crt'}"
                in (tmp_path / "ingress.log").read_text(errors="replace")
            ),
            30,
            "ingress to take its renewed certificate",
        )
        stop_process(relay.processes["queue"])
        relay.start("queue")
        assert _sent_over_mtls(relay, "after").startswith("250 2.0.0")
        delivered = sink.wait_for(2)
        assert all(
            any(f"Subject: {marker}\r\n".encode() in m.content for m in delivered)
            for marker in ("before", "after")
        )
