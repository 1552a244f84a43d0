"""Ingress's client of the queue's Enqueue RPC, over plain gRPC or mutual TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from kurrier.core.telemetry import grpc_metadata
from kurrier.v1 import queue_pb2, queue_pb2_grpc

CHUNK_SIZE = 256 * 1024
# Bodies up to this size are sent in one request (gRPC's default limit on a
# received message is 4 MiB).
UNARY_LIMIT = 1024 * 1024
# Long enough to ride out a queue restart (wait_for_ready), short enough that the
# SMTP client gets its 451 well within its own DATA timeout.
ENQUEUE_TIMEOUT = 20.0


async def _stream(
    envelope: queue_pb2.Envelope, parts: list[bytes]
) -> AsyncIterator[queue_pb2.EnqueueRequest]:
    yield queue_pb2.EnqueueRequest(envelope=envelope)
    for part in parts:
        view = memoryview(part)
        for start in range(0, len(view), CHUNK_SIZE):
            yield queue_pb2.EnqueueRequest(chunk=bytes(view[start : start + CHUNK_SIZE]))


class QueueUnavailable(Exception):
    """The queue did not confirm durable storage; the client must retry later."""


class QueueFull(QueueUnavailable):
    """The message store is out of space; the client must retry later."""


@dataclass(frozen=True)
class QueueTls:
    """Mutual TLS to the queue: the CA that signed the queue's certificate, and ours."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None  # when the address is not the name in the certificate

    def channel(self, address: str) -> grpc.aio.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes(),
            private_key=Path(self.key_file).read_bytes() if self.key_file else None,
            certificate_chain=Path(self.cert_file).read_bytes() if self.cert_file else None,
        )
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.aio.secure_channel(address, credentials, options=options)


class QueueClient:
    def __init__(self, address: str, tls: QueueTls | None = None) -> None:
        self._channel = tls.channel(address) if tls else grpc.aio.insecure_channel(address)
        self._stub = queue_pb2_grpc.QueueServiceStub(self._channel)

    async def enqueue(self, envelope: queue_pb2.Envelope, parts: list[bytes]) -> str:
        """Send envelope and body; returns the queue id once the message is durably stored.

        A body up to UNARY_LIMIT goes in one EnqueueMessage request; a larger
        one is streamed in chunks, so neither side holds a huge gRPC message.
        """
        size = sum(len(part) for part in parts)
        try:
            if size <= UNARY_LIMIT:
                response = await self._stub.EnqueueMessage(
                    queue_pb2.EnqueueMessageRequest(envelope=envelope, body=b"".join(parts)),
                    **self._call_options(),
                )
            else:
                response = await self._stub.Enqueue(
                    _stream(envelope, parts), **self._call_options()
                )
        except grpc.aio.AioRpcError as error:
            failure = (
                QueueFull
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                else QueueUnavailable
            )
            raise failure(f"{error.code().name}: {error.details()}") from error
        return str(response.queue_id)

    @staticmethod
    def _call_options() -> dict[str, Any]:
        return {
            "timeout": ENQUEUE_TIMEOUT,
            "wait_for_ready": True,
            # The message's trace continues in the queue (its server interceptor).
            "metadata": grpc_metadata(),
        }

    async def close(self) -> None:
        await self._channel.close()
