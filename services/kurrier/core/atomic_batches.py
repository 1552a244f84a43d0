"""Concurrent writes into one stream, stored together as JetStream atomic batches.

A stream that syncs every write (`sync_interval: always`, the single-node
promise) stores its messages one fsync at a time, however many publishers
wait. An atomic batch (NATS ADR-50, nats-server 2.12+) is staged and then
committed with a handful of fsyncs whatever its size
(bench/results/2026-12-05-atomic-batches.md), so the writes that pile up
while earlier ones are being stored go out as one batch once there are at
least `min_size` of them. Fewer wait as single publishes, side by side, as
they would without this module: no timer holds a lone write back.

Each caller sees what a plain publish would give it: its own PubAck or its
own error. A batch is all or nothing, so when one is refused (a member's
expected-sequence check, a duplicate message id, a server limit) or its
outcome is unknown (no reply), its members are published again one by one.
Every member carries a Nats-Msg-Id for that: a member the lost batch did
store is then reported as a duplicate, not stored twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field

from kurrier.core.metrics import ATOMIC_BATCHES
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import Header, PubAck
from nats.js.errors import APIError

log = logging.getLogger(__name__)

BATCH_ID = "Nats-Batch-Id"
BATCH_SEQUENCE = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"

# nats-server takes at most 1,000 messages in an atomic batch and 50 batches
# in flight per stream; these stay well inside both.
MAX_MEMBERS = 256
MAX_BYTES = 4 * 1024 * 1024
WRITERS = 2

_ATOMIC_PUBLISH_DISABLED = 10174


@dataclass
class _Write:
    subject: str
    payload: bytes
    headers: dict[str, str]
    done: asyncio.Future[PubAck] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def settle(self, result: PubAck | BaseException) -> None:
        # A caller that gave up (cancelled) has no one left to tell.
        if self.done.done():
            return
        if isinstance(result, BaseException):
            self.done.set_exception(result)
        else:
            self.done.set_result(result)


class AtomicBatches:
    """Publishes into `stream`, in atomic batches of at least min_size when writes pile up.

    min_size 0 turns batching off: every write is a plain publish. The
    stream must have allow_atomic; if it turns out not to, batching stops
    (logged once) and writes go out one by one.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        min_size: int = 0,
        nc: NATS | None = None,
        timeout: float = 5.0,
    ) -> None:
        if min_size == 1 or min_size < 0:
            raise ValueError("an atomic batch needs at least 2 members (or 0: off)")
        if min_size and nc is None:
            raise ValueError("batches are sent on the NATS connection: nc is needed")
        self._nc = nc
        self._js = js
        self._stream = stream
        self._min_size = min_size
        self._timeout = timeout
        # Batches by outcome (stored, refused), as the metric counts them.
        self.batches: Counter[str] = Counter()
        self._pending: list[_Write] = []
        self._writers: set[asyncio.Task[None]] = set()

    @property
    def batching(self) -> bool:
        return self._min_size > 0

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> PubAck:
        """Store one message; its PubAck, or the APIError a plain publish would raise."""
        if not self.batching:
            return await self._single(subject, payload, headers)
        if Header.MSG_ID.value not in headers:
            raise ValueError("a write that may go in a batch needs a Nats-Msg-Id")
        write = _Write(subject, payload, headers)
        self._pending.append(write)
        if len(self._writers) < WRITERS:
            writer = asyncio.create_task(self._write_pending())
            self._writers.add(writer)
            # A writer cancelled before it ever ran leaves through this; one
            # that ran leaves itself (_write_pending).
            writer.add_done_callback(self._writers.discard)
        return await write.done

    async def _single(self, subject: str, payload: bytes, headers: dict[str, str]) -> PubAck:
        return await self._js.publish(
            subject, payload, timeout=self._timeout, stream=self._stream, headers=dict(headers)
        )

    async def _write_pending(self) -> None:
        """One writer: takes what is pending, writes it, again until nothing is left.

        It stops counting as a writer in the same step as it finds nothing
        pending: left to its task's done callback, which runs a turn later,
        a write added in between would see all writers taken and wait for
        one that never comes.
        """
        try:
            await self._write_until_none_pending()
        finally:
            self._writers.discard(asyncio.current_task())

    async def _write_until_none_pending(self) -> None:
        while self._pending:
            writes = self._take()
            if not writes:
                return
            try:
                if self.batching and len(writes) >= self._min_size:
                    await self._write_batch(writes)
                else:
                    await asyncio.gather(*(self._write_single(w) for w in writes))
            except BaseException as error:
                for write in writes:
                    write.settle(error)
                if not isinstance(error, Exception):
                    raise

    def _take(self) -> list[_Write]:
        # A write whose caller gave up before it went out is not sent at all:
        # the caller has told its own client the store failed.
        self._pending = [write for write in self._pending if not write.done.done()]
        count, size = 0, 0
        for write in self._pending:
            size += len(write.payload)
            if count and (count == MAX_MEMBERS or size > MAX_BYTES):
                break
            count += 1
        writes, self._pending = self._pending[:count], self._pending[count:]
        return writes

    async def _write_single(self, write: _Write) -> None:
        try:
            write.settle(await self._single(write.subject, write.payload, write.headers))
        except Exception as error:
            write.settle(error)

    async def _write_batch(self, writes: list[_Write]) -> None:
        try:
            ack = await self._commit(writes)
        except (APIError, NatsError, TimeoutError) as error:
            self._count("refused")
            if isinstance(error, APIError) and error.err_code == _ATOMIC_PUBLISH_DISABLED:
                log.warning("%s does not take atomic batches; writing one by one", self._stream)
                self._min_size = 0
            else:
                log.info(
                    "a batch of %d into %s failed, writing them one by one: %r",
                    len(writes),
                    self._stream,
                    error,
                )
            await asyncio.gather(*(self._write_single(w) for w in writes))
            return
        self._count("stored")
        # The commit's PubAck names the last member's sequence; the batch is
        # stored contiguously, so each member's follows from its position.
        last = len(writes) - 1
        for position, write in enumerate(writes):
            write.settle(
                PubAck(stream=ack.stream, seq=ack.seq - (last - position), domain=ack.domain)
            )

    def _count(self, outcome: str) -> None:
        self.batches[outcome] += 1
        ATOMIC_BATCHES.add(1, {"stream": self._stream, "outcome": outcome})

    async def _commit(self, writes: list[_Write]) -> PubAck:
        """Send one atomic batch; the commit's PubAck, or the error that refused it.

        The first member and the commit are requests: the server answers the
        first once it has opened the batch, and the commit with its PubAck
        once the batch is stored. The members between are plain publishes.
        """
        nc = self._nc
        assert nc is not None  # __init__ requires it when batching
        batch = uuid.uuid4().hex
        last = len(writes)
        answer: dict[str, object] = {}
        for sequence, write in enumerate(writes, start=1):
            headers = {
                **write.headers,
                Header.EXPECTED_STREAM.value: self._stream,
                BATCH_ID: batch,
                BATCH_SEQUENCE: str(sequence),
            }
            if sequence == last:
                headers[BATCH_COMMIT] = "1"
            if sequence in (1, last):
                reply = await nc.request(
                    write.subject, write.payload, timeout=self._timeout, headers=headers
                )
                answer = json.loads(reply.data) if reply.data else {}
                if "error" in answer:
                    raise APIError.from_error(answer["error"])  # type: ignore[arg-type]
            else:
                await nc.publish(write.subject, write.payload, headers=headers)
        return PubAck.from_response(answer)
