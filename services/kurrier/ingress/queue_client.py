"""Ingress's client of the queue's Enqueue RPC, over plain gRPC or mutual TLS that follows
a renewed client certificate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from kurrier.core.background import Background
from kurrier.core.grpc_tls import QueueTls, queue_channel
from kurrier.core.telemetry import grpc_metadata, inject_headers
from kurrier.ingress.enqueue_stream import EnqueueStream, StreamEnded
from kurrier.v1 import queue_pb2, queue_pb2_grpc

CHUNK_SIZE = 256 * 1024
# Bodies up to this size are sent in one request (gRPC's default limit on a
# received message is 4 MiB).
WHOLE_MESSAGE_LIMIT = 1024 * 1024
# Long enough to ride out a queue restart (wait_for_ready), short enough that the
# SMTP client gets its 451 well within its own DATA timeout.
ENQUEUE_TIMEOUT = 20.0
# Times a message left unstored by a cleanly ended stream is sent again on a
# new one (a queue that shut down; the next call reaches its successor).
RESENDS = 3
# How often the client certificate's files are looked at (a stat each).
CERTIFICATE_CHECK_INTERVAL = 2.0


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


class QueueClient:
    def __init__(
        self, address: str, tls: QueueTls | None = None, timeout: float = ENQUEUE_TIMEOUT
    ) -> None:
        self._timeout = timeout
        self._address = address
        self._tls = tls
        self.certificate = tls.files() if tls is not None else None
        self._channel = (
            tls.channel(address, pair=self.certificate.load() if self.certificate else None)
            if tls is not None
            else queue_channel(address, None)
        )
        self._stub = queue_pb2_grpc.QueueServiceStub(self._channel)
        self._stream: EnqueueStream | None = None
        self._retiring = Background()

    async def follow_certificate(self) -> None:
        """Take a renewed client certificate into a new channel for the messages that come
        next. The channel holds its certificate for the connections it makes, and a
        connection made with an expired one is refused: the old channel ends once
        what it carries is answered."""
        assert self._tls is not None and self.certificate is not None
        while True:
            await asyncio.sleep(CERTIFICATE_CHECK_INTERVAL)
            pair = self.certificate.renewed()
            if pair is None:
                continue
            old_channel, old_stream = self._channel, self._stream
            self._channel = self._tls.channel(self._address, pair=pair)
            self._stub = queue_pb2_grpc.QueueServiceStub(self._channel)
            self._stream = None
            self._retiring.start(self._retire(old_channel, old_stream))

    async def _retire(self, channel: grpc.aio.Channel, stream: EnqueueStream | None) -> None:
        try:
            if stream is not None:
                await stream.close_when_answered()
        finally:
            # An Enqueue call in flight has its timeout to finish.
            await channel.close(grace=self._timeout)

    async def enqueue(self, envelope: queue_pb2.Envelope, parts: list[bytes]) -> str:
        """Send envelope and body; returns the queue id once the message is durably stored.

        A body up to WHOLE_MESSAGE_LIMIT goes in one request on the shared
        EnqueueMessages stream; a larger one is streamed in chunks by its own
        Enqueue call, so neither side holds a huge gRPC message.
        """
        size = sum(len(part) for part in parts)
        if size <= WHOLE_MESSAGE_LIMIT:
            request = queue_pb2.EnqueueMessageRequest(
                envelope=envelope, body=b"".join(parts), trace_context=inject_headers()
            )
            return await self._enqueue_on_stream(request)
        try:
            response = await self._stub.Enqueue(
                _stream(envelope, parts),
                timeout=self._timeout,
                wait_for_ready=True,
                # The message's trace continues in the queue (its server interceptor).
                metadata=grpc_metadata(),
            )
        except grpc.aio.AioRpcError as error:
            raise _failure(error.code(), error.details() or "") from error
        return str(response.queue_id)

    async def _enqueue_on_stream(self, request: queue_pb2.EnqueueMessageRequest) -> str:
        try:
            async with asyncio.timeout(self._timeout):
                for _ in range(RESENDS + 1):
                    try:
                        result = await self._open_stream().send(request)
                    except StreamEnded as ended:
                        if ended.stored_maybe:
                            raise QueueUnavailable(str(ended)) from ended
                        continue
                    code = _STATUS_BY_VALUE.get(result.code, grpc.StatusCode.UNKNOWN)
                    if code != grpc.StatusCode.OK:
                        raise _failure(code, result.message)
                    return str(result.queue_id)
        except TimeoutError as error:
            raise QueueUnavailable("DEADLINE_EXCEEDED: no answer from the queue") from error
        raise QueueUnavailable("the queue kept ending the call unanswered")

    def _open_stream(self) -> EnqueueStream:
        if self._stream is None or self._stream.ended is not None:
            self._stream = EnqueueStream(self._stub)
        return self._stream

    async def close(self) -> None:
        self._retiring.cancel()
        await self._retiring.finished()
        if self._stream is not None:
            await self._stream.close()
        await self._channel.close()


_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


def _failure(code: grpc.StatusCode, details: str) -> QueueUnavailable:
    failure = QueueFull if code == grpc.StatusCode.RESOURCE_EXHAUSTED else QueueUnavailable
    return failure(f"{code.name}: {details}")
