"""Ingress's client of the queue's Enqueue RPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from kurrier.v1 import queue_pb2, queue_pb2_grpc

CHUNK_SIZE = 256 * 1024
# Long enough to ride out a queue restart (wait_for_ready), short enough that the
# SMTP client gets its 451 well within its own DATA timeout.
ENQUEUE_TIMEOUT = 20.0


class QueueUnavailable(Exception):
    """The queue did not confirm durable storage; the client must retry later."""


class QueueClient:
    def __init__(self, address: str) -> None:
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = queue_pb2_grpc.QueueServiceStub(self._channel)

    async def enqueue(self, envelope: queue_pb2.Envelope, parts: list[bytes]) -> str:
        """Stream envelope and body parts; returns the queue id once the body is stored."""

        async def requests() -> AsyncIterator[queue_pb2.EnqueueRequest]:
            yield queue_pb2.EnqueueRequest(envelope=envelope)
            for part in parts:
                view = memoryview(part)
                for start in range(0, len(view), CHUNK_SIZE):
                    yield queue_pb2.EnqueueRequest(chunk=bytes(view[start : start + CHUNK_SIZE]))

        try:
            response = await self._stub.Enqueue(
                requests(), timeout=ENQUEUE_TIMEOUT, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as error:
            raise QueueUnavailable(f"{error.code().name}: {error.details()}") from error
        return str(response.queue_id)

    async def close(self) -> None:
        await self._channel.close()
