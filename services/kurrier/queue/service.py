"""The QueueService gRPC API: Enqueue stores a message durably before it answers;
the admin calls list, show, hold, release, delete and retry, messages' history, and the
traffic shaping of destination sites."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import tempfile
from collections.abc import AsyncIterator
from typing import IO

import grpc
import nats.errors
import nats.js.errors
from google.protobuf.unknown_fields import UnknownFieldSet
from kurrier.core.background import Background
from kurrier.core.batch_writer import BatchWriter
from kurrier.core.body_store import load_body
from kurrier.core.domains import InvalidDomain, canonical_address, normalise_domain
from kurrier.core.dsn_parameters import dsn_problem
from kurrier.core.history import HISTORY, trace_id_of
from kurrier.core.jetstream import INLINE_BODY_LIMIT, SHAPING_BUCKET, storage_full
from kurrier.core.message import MessageRecord, RecipientState
from kurrier.core.records import RecordStore
from kurrier.core.routing import domain_of
from kurrier.core.smtp_text import header_section
from kurrier.core.telemetry import serving_message
from kurrier.delivery.site_states import SiteState, site_states
from kurrier.queue import admin
from kurrier.queue.changes import Change
from kurrier.queue.history_search import search_history
from kurrier.queue.manager import QueueManager
from kurrier.v1 import queue_pb2, queue_pb2_grpc
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

# Queue ids become NATS subject tokens and KV keys: keep them to a safe alphabet.
QUEUE_ID_RE = re.compile(r"^[A-Za-z0-9]{8,64}$")
NATS_FAILURES = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)
STATES = ("active", "deferred", "held")
# What an administrator's change of a message is in its history (a delete: QueueManager).
ADMIN_EVENTS = {
    queue_pb2.ACTION_HOLD: "held",
    queue_pb2.ACTION_RELEASE: "released",
    queue_pb2.ACTION_RETRY: "retry requested",
}
# Messages of one EnqueueMessages call being stored at once; past this the
# server reads no further until one is done, so a client cannot pile up work.
STREAM_IN_FLIGHT = 256
# What a refused Enqueue still reads of its stream before answering (see _drain).
DRAIN_LIMIT = 64 * 1024 * 1024
# The many-messages stream: its spans are per message (serving_message), not per call.
STREAM_METHOD = "EnqueueMessages"
STREAM_RPC = f"/kurrier.v1.QueueService/{STREAM_METHOD}"


class InvalidRequest(Exception):
    pass


class Refused(Exception):
    """The message was not stored: the status the call (or the stream's result) ends with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_envelope(envelope: queue_pb2.Envelope) -> None:
    newer = fields_not_known(envelope)
    if newer:
        # Every field of an envelope is something the message asks for
        # (REQUIRETLS, its namespace...): stored without it, the message would
        # go out as it did not ask. UNAVAILABLE: the client tries again, and an
        # up-to-date queue pod takes it (docs/architecture.md, Contracts).
        log.warning(
            "refusing message %s: its envelope has fields this version does not know "
            "(numbers %s), from a newer client; roll the queue before ingress",
            envelope.queue_id,
            newer,
        )
        raise Refused(
            grpc.StatusCode.UNAVAILABLE,
            f"the envelope has fields this queue does not know (numbers {newer})",
        )
    if not QUEUE_ID_RE.match(envelope.queue_id):
        raise InvalidRequest("queue_id must be 8-64 letters or digits")
    if not envelope.recipients:
        raise InvalidRequest("at least one recipient is required")
    if envelope.size < 0:
        raise InvalidRequest("size must not be negative")
    for address in (envelope.mail_from, *envelope.recipients):
        try:
            canonical_address(address)
        except InvalidDomain as error:
            raise InvalidRequest(str(error)) from None
    problem = dsn_problem(
        envelope.dsn_ret,
        envelope.dsn_envid,
        [(given.notify, given.orcpt) for given in envelope.recipient_dsn],
    )
    if problem:
        raise InvalidRequest(problem)
    if not {given.address for given in envelope.recipient_dsn} <= set(envelope.recipients):
        raise InvalidRequest("recipient_dsn names an address that is not a recipient")


def fields_not_known(envelope: queue_pb2.Envelope) -> list[int]:
    """The numbers of the fields of a newer kurrier.v1 the envelope carries."""
    numbers: set[int] = set()
    for part in (envelope, *envelope.recipient_dsn):
        found = UnknownFieldSet(part)
        numbers.update(found[index].field_number for index in range(len(found)))
    return sorted(numbers)


async def _drain(requests: AsyncIterator[queue_pb2.EnqueueRequest]) -> None:
    """Read what the client still sends, up to DRAIN_LIMIT, before it is answered.

    Ended while the client still writes its body, the call's status reaches
    grpc.aio's client as INTERNAL for the write that failed, not as the status
    sent (grpc/grpc#36066): ingress would not hear that the store is full or that
    another queue should take the message. A client that keeps sending past the
    limit gets the answer anyway; one that breaks off has nothing left to hear.
    """
    left = DRAIN_LIMIT
    with contextlib.suppress(Exception):
        async for request in requests:
            left -= len(request.chunk)
            if left < 0:
                return


def check_size(envelope: queue_pb2.Envelope, size: int) -> None:
    if size != envelope.size:
        raise InvalidRequest(f"body has {size} bytes, envelope says {envelope.size}")


def matches(record: MessageRecord, selector: queue_pb2.MessageFilter) -> bool:
    if selector.queue_ids:
        return record.queue_id in selector.queue_ids
    if selector.state and record.state != selector.state:
        return False
    if selector.tenant and record.tenant != selector.tenant:
        return False
    if selector.null_sender and record.mail_from:
        return False
    if selector.sender and record.mail_from.lower() != canonical_address(selector.sender).lower():
        return False
    domain = normalise_domain(selector.recipient_domain) if selector.recipient_domain else ""
    return not domain or any(domain_of(r.address) == domain for r in record.pending())


def _recipient_status(state: RecipientState) -> queue_pb2.RecipientStatus:
    return queue_pb2.RecipientStatus(
        address=state.address,
        status=state.status,
        attempts=state.attempts,
        last_reply=state.last_reply,
        next_attempt=state.next_attempt if state.status == "deferred" else 0.0,
        history=[queue_pb2.Attempt(at=a.at, reply=a.reply) for a in state.history],
        notify=state.notify,
        orcpt=state.orcpt,
    )


def site_of(state: SiteState) -> queue_pb2.SiteState:
    return queue_pb2.SiteState(
        name=state.name,
        max_connections=state.configured.connections or 0,
        messages_per_minute=state.configured.per_minute or 0,
        allowed_connections=state.allowed.connections or 0,
        allowed_messages_per_minute=state.allowed.per_minute or 0,
        connections=state.connections,
        messages_last_minute=state.messages_last_minute,
        slowed_since=state.slowed_since or 0.0,
    )


def summary_of(record: MessageRecord) -> queue_pb2.MessageSummary:
    return queue_pb2.MessageSummary(
        queue_id=record.queue_id,
        sender=record.mail_from,
        received_at=record.received_at,
        size=record.size,
        state=record.state,
        recipients=[_recipient_status(r) for r in record.recipients],
        tenant=record.tenant,
    )


class QueueService(queue_pb2_grpc.QueueServiceServicer):
    def __init__(self, js: JetStreamContext, records: RecordStore, manager: QueueManager) -> None:
        self._js = js
        self._records = records
        self._manager = manager
        # Set at shutdown: EnqueueMessages calls stop reading and end once answered.
        self._closing = asyncio.Event()

    def close_streams(self) -> None:
        """Let every EnqueueMessages call finish what it read and end (before server.stop)."""
        self._closing.set()

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
                            raise InvalidRequest("the first request must carry the envelope")
                        envelope = request.envelope
                        check_envelope(envelope)
                    elif part == "chunk":
                        size += len(request.chunk)
                        if size > envelope.size:
                            raise InvalidRequest("body is longer than the envelope's size")
                        body.write(request.chunk)
                    else:
                        raise InvalidRequest("only body chunks may follow the envelope")
                if envelope is None:
                    raise InvalidRequest("empty request stream")
                check_size(envelope, size)
                await self._store(envelope, body, size)
            except InvalidRequest as error:
                await _drain(request_iterator)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
                raise  # abort() raises; this keeps type checkers aware
            except Refused as refusal:
                await _drain(request_iterator)
                await context.abort(refusal.code, refusal.message)
                raise
        return queue_pb2.EnqueueResponse(queue_id=envelope.queue_id)

    # A coroutine writing through context, which grpc.aio allows for a stream
    # of responses; the generated stub only knows the iterator form.
    async def EnqueueMessages(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[queue_pb2.EnqueueBatch],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Store each message of the stream concurrently; answer each once stored.

        Answers go out in batches: those ready while the previous batch was being
        written, or in the same turn of the event loop, go together.

        The handler ends the call when the client has sent everything and all
        of it is answered, or at shutdown once what was read is answered: a
        request read after that is left unanswered (and unstored), which the
        OK end tells the client.
        """
        answering = Background()
        room = asyncio.Semaphore(STREAM_IN_FLIGHT)

        async def write(results: list[queue_pb2.EnqueueResult]) -> None:
            await context.write(queue_pb2.EnqueueResults(results=results))

        def client_gone(unanswered: list[queue_pb2.EnqueueResult], error: BaseException) -> None:
            # Stored but unanswered: the SMTP client, told 451, sends again.
            if unanswered:
                log.info(
                    "%d answer(s) not delivered, the client is gone: %r", len(unanswered), error
                )

        answers = BatchWriter(write, client_gone)

        async def answer(request: queue_pb2.EnqueueMessageRequest) -> None:
            result = queue_pb2.EnqueueResult(queue_id=request.envelope.queue_id)
            try:
                with serving_message(STREAM_RPC, request.trace_context):
                    await self._enqueue_one(request)
            except Refused as refusal:
                result.code = refusal.code.value[0]
                result.message = refusal.message
            except Exception:
                log.exception("enqueue failed", extra={"queue_id": result.queue_id})
                result.code = grpc.StatusCode.INTERNAL.value[0]
                result.message = "internal error"
            finally:
                room.release()
            answers.add(result)

        async def read() -> None:
            async for batch in request_iterator:
                for request in batch.messages:
                    await room.acquire()
                    if self._closing.is_set():
                        return
                    answering.start(answer(request))

        reading = asyncio.create_task(read())
        closing = asyncio.create_task(self._closing.wait())
        try:
            await asyncio.wait((reading, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            await answering.finished()
            await answers.close()
            if reading.done():
                reading.result()  # a broken call ends with its error
            else:
                # Shutting down: the read stays blocked until the call ends.
                reading.cancel()

    async def _enqueue_one(self, request: queue_pb2.EnqueueMessageRequest) -> None:
        """Check and store one whole message; raises Refused with the reason it was not."""
        envelope = request.envelope
        try:
            if not request.HasField("envelope"):
                raise InvalidRequest("the request must carry the envelope")
            check_envelope(envelope)
            check_size(envelope, len(request.body))
        except InvalidRequest as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error
        await self._store(envelope, io.BytesIO(request.body), len(request.body))

    async def _store(self, envelope: queue_pb2.Envelope, body: IO[bytes], size: int) -> None:
        """Store a checked message durably; raises Refused with the reason it was not."""
        dsn = {given.address: given for given in envelope.recipient_dsn}
        template = MessageRecord(
            queue_id=envelope.queue_id,
            # Any client's addresses in the one form ingress gives them (core/domains.py).
            mail_from=canonical_address(envelope.mail_from),
            recipients=[
                RecipientState(
                    address=canonical_address(r),
                    notify=dsn[r].notify if r in dsn else "",
                    orcpt=dsn[r].orcpt if r in dsn else "",
                )
                for r in envelope.recipients
            ],
            received_at=0.0,
            size=size,
            body_store="stream",
            client_address=envelope.client_address,
            client_helo=envelope.client_helo,
            authenticated_as=envelope.authenticated_as,
            client_trusted=envelope.client_trusted,
            tenant=envelope.tenant,
            smtputf8=envelope.smtputf8,
            body_type=envelope.body_type,
            message_id_header=envelope.message_id_header,
            dsn_ret=envelope.dsn_ret,
            dsn_envid=envelope.dsn_envid,
            require_tls=envelope.require_tls,
        )
        try:
            await self._manager.intake.accept(template, body, size)
        except NATS_FAILURES as error:
            log.warning(
                "enqueue failed, the client will retry: %r",
                error,
                extra={"queue_id": envelope.queue_id},
            )
            if storage_full(error):
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "message store full") from error
            raise Refused(grpc.StatusCode.UNAVAILABLE, "message store unavailable") from error

    async def _select(self, selector: queue_pb2.MessageFilter) -> list[MessageRecord]:
        if selector.state and selector.state not in STATES:
            raise InvalidRequest(f"state must be one of {', '.join(STATES)}")
        if selector.queue_ids:
            found = [await self._records.get(q, fresh=True) for q in selector.queue_ids]
            return [entry[0] for entry in found if entry is not None]
        try:
            selected = [r async for r in self._records.all() if matches(r, selector)]
        except InvalidDomain as error:
            raise InvalidRequest(str(error)) from None
        return sorted(selected, key=lambda r: r.received_at)

    async def ListMessages(
        self, request: queue_pb2.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> queue_pb2.ListMessagesResponse:
        try:
            selected = await self._select(request.filter)
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        shown = selected[: request.limit] if request.limit > 0 else selected
        return queue_pb2.ListMessagesResponse(
            messages=[summary_of(r) for r in shown], total=len(selected)
        )

    async def GetMessage(
        self, request: queue_pb2.GetMessageRequest, context: grpc.aio.ServicerContext
    ) -> queue_pb2.MessageDetail:
        found = await self._records.get(request.queue_id, fresh=True)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no message {request.queue_id}")
            raise InvalidRequest(request.queue_id)
        record = found[0]
        try:
            body = await load_body(self._js, record)
        except nats.js.errors.NotFoundError:
            body = b""
        return queue_pb2.MessageDetail(
            summary=summary_of(record),
            client_address=record.client_address,
            client_helo=record.client_helo,
            authenticated_as=record.authenticated_as,
            client_trusted=record.client_trusted,
            message_id_header=record.message_id_header,
            headers=header_section(body),
            dsn_ret=record.dsn_ret,
            dsn_envid=record.dsn_envid,
            require_tls=record.require_tls,
        )

    async def ApplyAction(
        self, request: queue_pb2.ActionRequest, context: grpc.aio.ServicerContext
    ) -> queue_pb2.ActionResponse:
        mutations: dict[int, Change] = {
            queue_pb2.ACTION_HOLD: admin.hold,
            queue_pb2.ACTION_RELEASE: admin.release,
            queue_pb2.ACTION_RETRY: admin.retry_now,
        }
        try:
            if request.action not in (*mutations, queue_pb2.ACTION_DELETE):
                raise InvalidRequest("action must be hold, release, delete or retry")
            if not request.filter.queue_ids and not request.all_matching:
                raise InvalidRequest("name queue ids, or set all_matching to act on a filter")
            selected = await self._select(request.filter)
        except InvalidRequest as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        changed = []
        for record in selected:
            if request.action == queue_pb2.ACTION_DELETE:
                if await self._manager.delete(record.queue_id):
                    changed.append(record.queue_id)
                continue
            before = record.model_dump()
            after = await self._manager.mutate(
                record.queue_id, mutations[request.action], fresh=True
            )
            if after is not None and after.model_dump() != before:
                changed.append(record.queue_id)
                HISTORY.record(
                    record.queue_id,
                    ADMIN_EVENTS[request.action],
                    trace_id=trace_id_of(after.traceparent),
                )
        log.info("admin %s on %d message(s)", queue_pb2.Action.Name(request.action), len(changed))
        return queue_pb2.ActionResponse(queue_ids=changed)

    async def MessageHistory(
        self, request: queue_pb2.HistoryRequest, context: grpc.aio.ServicerContext
    ) -> queue_pb2.HistoryResponse:
        try:
            if bool(request.queue_id) == bool(request.sender or request.recipient):
                raise InvalidRequest("give a queue id, or a sender or recipient")
            if request.queue_id and not QUEUE_ID_RE.match(request.queue_id):
                raise InvalidRequest("queue_id must be 8-64 letters or digits")
            events = await search_history(
                self._js, request.queue_id, request.sender, request.recipient, request.since
            )
        except (InvalidRequest, InvalidDomain) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise
        return queue_pb2.HistoryResponse(
            events=[
                queue_pb2.HistoryEvent(
                    at=event.at,
                    queue_id=event.queue_id,
                    service=event.service,
                    event=event.event,
                    details=event.details,
                    trace_id=event.trace_id,
                )
                for event in events
            ]
        )

    async def ListSites(
        self, request: queue_pb2.ListSitesRequest, context: grpc.aio.ServicerContext
    ) -> queue_pb2.ListSitesResponse:
        try:
            states = await site_states(await self._js.key_value(SHAPING_BUCKET))
        except NATS_FAILURES as error:
            # Not UNAVAILABLE: the queue answers, the bucket it reads does not.
            await context.abort(
                grpc.StatusCode.INTERNAL, f"cannot read {SHAPING_BUCKET}: {error!r}"
            )
            raise
        return queue_pb2.ListSitesResponse(sites=[site_of(state) for state in states])
