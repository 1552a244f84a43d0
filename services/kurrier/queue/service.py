"""The QueueService gRPC API: Enqueue stores a message durably before it answers."""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import AsyncIterator

import grpc
import nats.errors
import nats.js.errors
from kurrier.core.body_store import store_body
from kurrier.core.jetstream import INLINE_BODY_LIMIT
from kurrier.core.message import MessageRecord, RecipientState
from kurrier.core.table_store import TableFollower
from kurrier.queue.dispatch import mark_dispatched, publish_jobs
from kurrier.queue.records import RecordStore
from kurrier.queue.scheduler import QueueManager
from kurrier.v1 import queue_pb2, queue_pb2_grpc
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

# Queue ids become NATS subject tokens and KV keys: keep them to a safe alphabet.
QUEUE_ID_RE = re.compile(r"^[A-Za-z0-9]{8,64}$")
NATS_FAILURES = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)


class InvalidEnqueue(Exception):
    pass


def check_envelope(envelope: queue_pb2.Envelope) -> None:
    if not QUEUE_ID_RE.match(envelope.queue_id):
        raise InvalidEnqueue("queue_id must be 8-64 letters or digits")
    if not envelope.recipients:
        raise InvalidEnqueue("at least one recipient is required")
    if envelope.size < 0:
        raise InvalidEnqueue("size must not be negative")


class QueueService(queue_pb2_grpc.QueueServiceServicer):
    def __init__(
        self,
        js: JetStreamContext,
        records: RecordStore,
        tables: TableFollower,
        manager: QueueManager,
    ) -> None:
        self._js = js
        self._records = records
        self._tables = tables
        self._manager = manager

    async def Enqueue(
        self,
        request_iterator: AsyncIterator[queue_pb2.EnqueueRequest],
        context: grpc.aio.ServicerContext,
    ) -> queue_pb2.EnqueueResponse:
        envelope: queue_pb2.Envelope | None = None
        size = 0
        # Bodies past the inline limit spill to disk, so a 25 MB message never
        # sits whole in memory here.
        with tempfile.SpooledTemporaryFile(max_size=INLINE_BODY_LIMIT + 1) as body:
            try:
                async for request in request_iterator:
                    part = request.WhichOneof("part")
                    if envelope is None:
                        if part != "envelope":
                            raise InvalidEnqueue("the first request must carry the envelope")
                        envelope = request.envelope
                        check_envelope(envelope)
                    elif part == "chunk":
                        size += len(request.chunk)
                        if size > envelope.size:
                            raise InvalidEnqueue("body is longer than the envelope's size")
                        body.write(request.chunk)
                    else:
                        raise InvalidEnqueue("only body chunks may follow the envelope")
                if envelope is None:
                    raise InvalidEnqueue("empty request stream")
                if size != envelope.size:
                    raise InvalidEnqueue(f"body has {size} bytes, envelope says {envelope.size}")
            except InvalidEnqueue as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                raise  # abort() raises; this keeps type checkers aware
            try:
                await self._store(envelope, body, size)
            except NATS_FAILURES as error:
                log.warning(
                    "enqueue failed, the client will retry: %r",
                    error,
                    extra={"queue_id": envelope.queue_id},
                )
                await context.abort(grpc.StatusCode.UNAVAILABLE, "message store unavailable")
                raise
        return queue_pb2.EnqueueResponse(queue_id=envelope.queue_id)

    async def _store(
        self, envelope: queue_pb2.Envelope, body: tempfile.SpooledTemporaryFile[bytes], size: int
    ) -> None:
        now = time.time()
        body_store = await store_body(self._js, envelope.queue_id, body, size)
        recipients = list(envelope.recipients)
        record = MessageRecord(
            queue_id=envelope.queue_id,
            mail_from=envelope.mail_from,
            recipients=[RecipientState(address=r) for r in recipients],
            received_at=now,
            size=size,
            body_store=body_store,
            client_address=envelope.client_address,
            client_helo=envelope.client_helo,
            authenticated_as=envelope.authenticated_as,
            smtputf8=envelope.smtputf8,
            body_type=envelope.body_type,
            message_id_header=envelope.message_id_header,
        )
        mark_dispatched(record, recipients, now)
        if not await self._records.create(record):
            # A retried Enqueue: the record is stored; publishing its first jobs
            # again is harmless (deduplicated by JetStream).
            found = await self._records.get(envelope.queue_id)
            if found is None or found[0].dispatches != 1:
                return
            record = found[0]
        await publish_jobs(self._js, self._tables.table, record, recipients)
        self._manager.watch(record)
        log.info(
            "queued from=<%s> nrcpt=%d size=%d",
            envelope.mail_from,
            len(recipients),
            size,
            extra={"queue_id": envelope.queue_id},
        )
