"""Least privilege on the queue's gRPC port: a real queue behind mutual TLS answers each
certificate of its CA only the calls its identity is given (`queue/callers.py`)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kurrier.core.grpc_tls import QueueTls, queue_channel
from kurrier.v1 import queue_pb2, queue_pb2_grpc

from tests.support.certs import Certificates
from tests.support.nats import NatsServer
from tests.support.relay import ServiceRelay

DENIED = grpc.StatusCode.PERMISSION_DENIED
OK = grpc.StatusCode.OK
BODY = b"Subject: callers\r\n\r\nhello\r\n"
QUEUED = "CALLERS000000001"
ENQUEUE = ("Enqueue", "EnqueueMessages")
ADMIN = ("ListMessages", "GetMessage", "ApplyAction", "MessageHistory", "ListSites")
# Every call the queue serves: a new one is refused until callers.py gives it an owner.
EVERY_CALL = (
    *queue_pb2.DESCRIPTOR.services_by_name["QueueService"].methods_by_name,
    *(
        f"Health/{name}"
        for name in health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name
    ),
)


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    details: str = ""


def _envelope(queue_id: str) -> queue_pb2.Envelope:
    return queue_pb2.Envelope(
        queue_id=queue_id, mail_from="a@client.test", recipients=["r@example.com"], size=len(BODY)
    )


async def _requests(*items: object) -> AsyncIterator[object]:
    for item in items:
        yield item


async def _call(
    stub: queue_pb2_grpc.QueueServiceStub,
    channel: grpc.aio.Channel,
    name: str,
    queue_id: str,
    refused: bool,
) -> None:
    """One call of each kind, as its real client makes it; raises on a status other than OK.

    A call expected to be refused streams no requests: the queue refuses
    before reading any, and a request written meanwhile may fail in the
    client's gRPC core first, which then reports its own INTERNAL error
    instead of the queue's answer.
    """
    if name == "Enqueue":
        envelope = queue_pb2.EnqueueRequest(envelope=_envelope(queue_id))
        requests = () if refused else (envelope, queue_pb2.EnqueueRequest(chunk=BODY))
        await stub.Enqueue(_requests(*requests), timeout=20)
    elif name == "EnqueueMessages":
        whole = queue_pb2.EnqueueMessageRequest(envelope=_envelope(queue_id), body=BODY)
        batches = () if refused else (queue_pb2.EnqueueBatch(messages=[whole]),)
        async for answered in stub.EnqueueMessages(_requests(*batches), timeout=20):
            assert [r.code for r in answered.results] == [OK.value[0]]
    elif name == "ListMessages":
        await stub.ListMessages(queue_pb2.ListMessagesRequest(), timeout=20)
    elif name == "GetMessage":
        await stub.GetMessage(queue_pb2.GetMessageRequest(queue_id=QUEUED), timeout=20)
    elif name == "ApplyAction":
        held = queue_pb2.ActionRequest(
            action=queue_pb2.ACTION_HOLD, filter=queue_pb2.MessageFilter(queue_ids=[QUEUED])
        )
        await stub.ApplyAction(held, timeout=20)
    elif name == "MessageHistory":
        await stub.MessageHistory(queue_pb2.HistoryRequest(queue_id=QUEUED), timeout=20)
    elif name == "ListSites":
        await stub.ListSites(queue_pb2.ListSitesRequest(), timeout=20)
    else:
        health = health_pb2_grpc.HealthStub(channel)
        if name == "Health/Check":
            await health.Check(health_pb2.HealthCheckRequest(), timeout=20)
        elif name == "Health/List":
            await health.List(health_pb2.HealthListRequest(), timeout=20)
        else:
            async for _ in health.Watch(health_pb2.HealthCheckRequest(), timeout=20):
                break


def answers(
    address: str, tls: QueueTls, *calls: str, queue_id: str = QUEUED, refused: bool = False
) -> dict[str, Answer]:
    """How the queue answers each named call made with this client's certificate
    (refused: the calls are expected to be refused, see _call)."""

    async def run() -> dict[str, Answer]:
        found = {}
        async with queue_channel(address, tls) as channel:
            stub = queue_pb2_grpc.QueueServiceStub(channel)
            for name in calls:
                try:
                    await _call(stub, channel, name, queue_id, refused)
                except grpc.aio.AioRpcError as error:
                    found[name] = Answer(error.code(), error.details() or "")
                else:
                    found[name] = Answer(OK)
        return found

    return asyncio.run(run())


@dataclass(frozen=True)
class Clients:
    address: str
    ingress: QueueTls
    admin: QueueTls
    stranger: QueueTls
    log: Path
    certificates: Certificates


@pytest.fixture
def queue(tmp_path: Path, nats_server: NatsServer) -> Iterator[Clients]:
    certificates = Certificates(tmp_path / "tls")
    relay = ServiceRelay(
        tmp_path,
        nats_server.url,
        service_args={
            "queue": [
                "--grpc-tls-cert",
                str(certificates.server_cert),
                "--grpc-tls-key",
                str(certificates.server_key),
                "--grpc-tls-client-ca",
                str(certificates.ca_file),
            ]
        },
    )
    relay.start("queue")
    ca, name = str(certificates.ca_file), "queue.test"
    # Signed by the same CA, so its handshake succeeds: only its identity is wrong.
    stranger_cert, stranger_key = certificates.issue("kurrier-delivery", client=True)
    try:
        yield Clients(
            relay.queue_address,
            QueueTls(ca, str(certificates.client_cert), str(certificates.client_key), name),
            QueueTls(ca, str(certificates.admin_cert), str(certificates.admin_key), name),
            QueueTls(ca, str(stranger_cert), str(stranger_key), name),
            tmp_path / "queue.log",
            certificates,
        )
    finally:
        relay.__exit__()


def test_ingress_may_only_enqueue(queue: Clients) -> None:
    enqueued = answers(queue.address, queue.ingress, "Health/Check", "Enqueue")
    assert enqueued == {"Health/Check": Answer(OK), "Enqueue": Answer(OK)}
    stream = answers(queue.address, queue.ingress, "EnqueueMessages", queue_id="CALLERS000000002")
    assert stream == {"EnqueueMessages": Answer(OK)}

    refused = answers(queue.address, queue.ingress, *ADMIN, refused=True)
    for name, answer in refused.items():
        assert answer.code == DENIED, name
        assert "for kurrier-queue-admin; this is certificate 'kurrier-ingress'" in answer.details
    # Nothing was held: the admin sees the message as ingress left it.
    listing = asyncio.run(_listing(queue.address, queue.admin))
    states = {m.queue_id: m.state for m in listing.messages}
    assert set(states) == {QUEUED, "CALLERS000000002"} and "held" not in states.values()


def test_the_admin_may_read_and_change_the_queue_but_not_enqueue(queue: Clients) -> None:
    assert answers(queue.address, queue.ingress, "Enqueue") == {"Enqueue": Answer(OK)}
    assert answers(queue.address, queue.admin, *ADMIN) == {name: Answer(OK) for name in ADMIN}
    [held] = asyncio.run(_listing(queue.address, queue.admin)).messages
    assert held.state == "held"
    for name in ENQUEUE:
        refused = answers(
            queue.address, queue.admin, name, queue_id="CALLERS000000003", refused=True
        )
        assert refused[name].code == DENIED, name
        assert "is for kurrier-ingress;" in refused[name].details


def test_an_unknown_identity_of_the_same_ca_gets_nothing(queue: Clients) -> None:
    assert answers(queue.address, queue.ingress, "Health/Check")["Health/Check"].code == OK
    for _ in range(2):
        refused = answers(queue.address, queue.stranger, *EVERY_CALL, refused=True)
        assert {name: answer.code for name, answer in refused.items()} == dict.fromkeys(
            EVERY_CALL, DENIED
        )
    # Each refusal is logged once for that identity, with the peer and without the certificate.
    log = queue.log.read_text(errors="replace")
    lines = [line for line in log.splitlines() if "'kurrier-delivery'" in line]
    assert len(lines) == len(EVERY_CALL), lines
    assert all("127.0.0.1" in line for line in lines)
    assert "BEGIN" not in log


async def _listing(address: str, tls: QueueTls) -> queue_pb2.ListMessagesResponse:
    async with queue_channel(address, tls) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        listing: queue_pb2.ListMessagesResponse = await stub.ListMessages(
            queue_pb2.ListMessagesRequest(), timeout=20
        )
        return listing


def _served_certificate(queue: Clients) -> bytes:
    """The certificate the queue's port presents to a new connection of ingress's."""
    host, port = queue.address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=queue.ingress.ca_file)
    context.load_cert_chain(str(queue.ingress.cert_file), str(queue.ingress.key_file))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, int(port)), 10) as raw,
        context.wrap_socket(raw, server_hostname="queue.test") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_a_renewed_certificate_is_served_to_new_connections_without_a_restart(
    queue: Clients,
) -> None:
    """The queue reads its files again before each handshake, once they changed."""
    certificates = queue.certificates
    before = _served_certificate(queue)
    cert, key = certificates.issue(
        "relay.test", "queue.test", "127.0.0.1", directory=certificates.directory / "renewed"
    )
    # A half-done renewal (new certificate, old key) is refused; the old pair serves on.
    shutil.copy(cert, certificates.server_cert)
    assert _served_certificate(queue) == before
    assert "new TLS certificate not loaded" in queue.log.read_text()
    shutil.copy(key, certificates.server_key)
    renewed = x509.load_pem_x509_certificate(cert.read_bytes())
    assert _served_certificate(queue) == renewed.public_bytes(serialization.Encoding.DER)
    # And calls go on over it, from the same clients.
    assert answers(queue.address, queue.ingress, "Enqueue") == {"Enqueue": Answer(OK)}
