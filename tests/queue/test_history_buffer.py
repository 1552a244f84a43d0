"""The history buffer of a process against a real nats-server: batches, and its bound."""

from __future__ import annotations

import asyncio
import logging

import pytest
from kurrier.core.history import BATCH_EVENTS, History, history_subject
from kurrier.core.jetstream import HISTORY_STREAM, connect, disconnect, ensure_layout
from kurrier.queue.history_search import read_history

from tests.support.nats import NatsServer


def test_events_go_out_in_batches_one_stored_message_each(nats_server: NatsServer) -> None:
    async def run() -> tuple[int, int]:
        nc = await connect(nats_server.url, "test")
        try:
            js = nc.jetstream()
            await ensure_layout(js)
            history = History()
            for n in range(2 * BATCH_EVENTS + 1):
                history.record(f"Q{n:08d}", "queued", trace_id="")
            await history.flush(js, history_subject("test"))
            stored = (await js.stream_info(HISTORY_STREAM)).state.messages
            events = [event async for event in read_history(js, 0)]
            return stored, len(events)
        finally:
            await disconnect(nc)

    assert asyncio.run(run()) == (3, 2 * BATCH_EVENTS + 1)


def test_a_full_buffer_drops_new_events_and_says_so(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> list[str]:
        nc = await connect(nats_server.url, "test")
        try:
            js = nc.jetstream()
            await ensure_layout(js)
            await js.delete_stream(HISTORY_STREAM)
            history = History(capacity=3)
            for n in range(5):
                history.record(f"Q{n:08d}", "queued", trace_id="")
            # No stream to take them: kept, not lost, while publishing fails.
            await history.flush(js, history_subject("test"))
            await ensure_layout(js)
            await history.flush(js, history_subject("test"))
            return [event.queue_id async for event in read_history(js, 0)]
        finally:
            await disconnect(nc)

    with caplog.at_level(logging.INFO, "kurrier.core.history"):
        kept = asyncio.run(run())
    assert kept == ["Q00000000", "Q00000001", "Q00000002"]
    assert "history: 2 event(s) dropped, the buffer was full" in caplog.text
    assert "history: publishing failed, keeping the events" in caplog.text
    assert "history: publishing again" in caplog.text


def test_cancelled_as_a_batch_fills_the_publisher_ends_and_publishes_once_more(
    nats_server: NatsServer,
) -> None:
    async def run() -> tuple[bool, int]:
        nc = await connect(nats_server.url, "test")
        try:
            js = nc.jetstream()
            await ensure_layout(js)
            history = History()
            publisher = asyncio.create_task(history.run(js, "test"))
            for _ in range(3):  # until the publisher waits for a full batch
                await asyncio.sleep(0)
            # A full batch wakes the publisher in the same turn of the loop as the
            # cancellation at shutdown: asyncio.wait_for would swallow that cancel.
            for n in range(BATCH_EVENTS):
                history.record(f"Q{n:08d}", "queued", trace_id="")
            publisher.cancel()
            await asyncio.wait({publisher}, timeout=10)
            ended = publisher.done() and publisher.cancelled()
            if not publisher.done():
                publisher.cancel()
            return ended, (await js.stream_info(HISTORY_STREAM)).state.messages
        finally:
            await disconnect(nc)

    assert asyncio.run(run()) == (True, 1)
