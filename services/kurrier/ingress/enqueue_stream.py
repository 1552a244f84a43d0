"""One EnqueueMessages call shared by every SMTP session: many messages in flight at once.

A unary call per message costs a call's setup on both sides (about twice the
CPU per message of a message on an open stream, in a grpc.aio microbenchmark
of 2026-11-30: bench/results/2026-11-30-bench-3663c1c.md), and each write on
the stream costs hand-offs between the event loop and gRPC's threads, so
messages go out in batches (core/batch_writer.py) and come back in batches.
Answers come in the order the queue stored the messages, so each waits for
its own by queue id.
"""

from __future__ import annotations

import asyncio

import grpc
from kurrier.core.batch_writer import BatchWriter
from kurrier.v1 import queue_pb2, queue_pb2_grpc

# Bytes of requests per batch: one message (up to 1 MiB of body) always goes,
# and a batch stays well inside gRPC's default 4 MiB limit on a received message.
BATCH_LIMIT = 2 * 1024 * 1024
# How long a batch may wait for the messages of sessions moving in step with
# the last batch's (core/batch_writer.py). A gRPC write costs ingress and the
# queue about as much CPU as the rest of a 1 KB message's passage between
# them; gathering 10 sessions' messages into one write instead of about
# three takes 0.90x the CPU per message at 1 KB and 10 sessions
# (bench/results/2026-12-06-enqueue-gather.md), and a message waits at most
# this long more for its 250.
GATHER = 0.003


class StreamEnded(Exception):
    """The call ended before the message was answered.

    stored_maybe is False when the queue ended the call cleanly (it answers
    everything it read before it does) or the request was never written: the
    message was not stored and may be sent again. After a broken call it may
    have been.
    """

    def __init__(self, reason: str, stored_maybe: bool) -> None:
        super().__init__(reason)
        self.stored_maybe = stored_maybe


class EnqueueStream:
    def __init__(self, stub: queue_pb2_grpc.QueueServiceStub) -> None:
        # No deadline on the call: it lives as long as ingress; each message
        # keeps its own.
        self._call = stub.EnqueueMessages(wait_for_ready=True)
        self._waiting: dict[str, asyncio.Future[queue_pb2.EnqueueResult]] = {}
        self._answered = asyncio.Event()  # set whenever no message waits
        self.ended: StreamEnded | None = None
        self._requests = BatchWriter[queue_pb2.EnqueueMessageRequest](
            self._write, self._write_failed, BATCH_LIMIT, _request_size, GATHER
        )
        self._reader = asyncio.create_task(self._read())

    async def send(self, request: queue_pb2.EnqueueMessageRequest) -> queue_pb2.EnqueueResult:
        """The queue's answer to one message; raises StreamEnded if the call ends first."""
        queue_id = request.envelope.queue_id
        answer: asyncio.Future[queue_pb2.EnqueueResult] = asyncio.get_running_loop().create_future()
        if self.ended is not None or not self._requests.add(request):
            raise StreamEnded("the call had ended", stored_maybe=False)
        self._waiting[queue_id] = answer
        try:
            return await answer
        except asyncio.CancelledError:
            # The message's deadline: unsent, it is simply not sent. Cut short in
            # the middle of a write, it leaves the call in no state to carry more:
            # the next message opens a new one.
            if not self._requests.take_back(request) and self._requests.is_being_written(request):
                self._abandon("a write was cut short by a message's deadline")
            raise
        finally:
            self._waiting.pop(queue_id, None)
            if not self._waiting:
                self._answered.set()

    async def _write(self, batch: list[queue_pb2.EnqueueMessageRequest]) -> None:
        await self._call.write(queue_pb2.EnqueueBatch(messages=batch))

    def _write_failed(
        self, unsent: list[queue_pb2.EnqueueMessageRequest], error: BaseException
    ) -> None:
        """A write refused or cut short: its messages and the rest were not stored.

        (A batch the queue did read is stored under the same queue ids, so
        sending them again stores nothing twice.)
        """
        ended = StreamEnded(f"writing failed: {error!r}", stored_maybe=False)
        for request in unsent:
            answer = self._waiting.get(request.envelope.queue_id)
            if answer is not None and not answer.done():
                answer.set_exception(ended)
        self._abandon(str(ended))

    def _abandon(self, reason: str) -> None:
        """Take no more messages and end the call; those waiting hear of it from _read."""
        if self.ended is None:
            self.ended = StreamEnded(reason, stored_maybe=True)
        self._call.cancel()

    async def _read(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
                    ended = StreamEnded("the queue ended the call", stored_maybe=False)
                    break
                for result in response.results:
                    answer = self._waiting.get(result.queue_id)
                    if answer is not None and not answer.done():
                        answer.set_result(result)
        except grpc.aio.AioRpcError as error:
            ended = StreamEnded(f"{error.code().name}: {error.details()}", stored_maybe=True)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # grpc.aio's read() raises this when the call itself was cancelled (_abandon).
            ended = StreamEnded("the call was abandoned", stored_maybe=True)
        except Exception as error:  # anything else broke the call just as surely
            ended = StreamEnded(f"reading failed: {error!r}", stored_maybe=True)
        self.ended = self.ended or ended
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(ended)
        # Its writer would wait for requests that never come, and be collected
        # pending with the stream the client drops.
        self._requests.cancel()

    async def close_when_answered(self) -> None:
        """End the call once no message waits on it; the caller sends it no more."""
        while self._waiting:
            self._answered.clear()
            await self._answered.wait()
        await self.close()

    async def close(self) -> None:
        """End the call; ingress closes it only once no transaction waits on it.

        Cancelled, not half-closed: a call still waiting for the queue to come up
        (wait_for_ready) would wait on for its half-close.
        """
        self._call.cancel()
        self._requests.cancel()
        await self._reader


def _request_size(request: queue_pb2.EnqueueMessageRequest) -> int:
    return len(request.body) + request.envelope.ByteSize()
