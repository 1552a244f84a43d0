"""While JetStream does not answer, the queue says so as a warning and carries on.

A node lost or a leader being elected heals by itself, so the results
consumer and the sweeper log it as a warning without a traceback; only what
would not heal by waiting (a bug) is an error. Here the only nats-server is
stopped while the queue holds a delivery result.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from kurrier.core.jetstream import (
    RESULTS_CONSUMER,
    RESULTS_STREAM,
    connect,
    disconnect,
    ensure_layout,
    result_subject,
)
from kurrier.core.lifecycle import cancel_and_wait
from kurrier.core.message import MessageRecord
from kurrier.core.records import RecordStore
from kurrier.core.table_store import TableFollower
from kurrier.queue.changes import CHANGED, Edit
from kurrier.queue.consumers import _settle
from kurrier.queue.manager import QueueManager
from kurrier.queue.retry_schedule import RetrySchedule
from kurrier.queue.sweeper import Sweeper
from nats.js.api import AckPolicy, ConsumerConfig

from tests.support.nats import NatsServer

QUEUE_ID = "AWAY0000000000000001"


def _touch(record: MessageRecord, now: float) -> Edit:
    return CHANGED


class Heard(logging.Handler):
    """Sets an event when a line containing text is logged."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [entry for entry in caplog.records if text in entry.getMessage()]


@pytest.mark.asyncio
async def test_jetstream_away_is_a_warning_not_an_error(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await connect(nats_server.url, "test-away")
    try:
        js = nc.jetstream(timeout=1)
        await ensure_layout(js)
        manager = QueueManager(
            js, await RecordStore.open(js), TableFollower(), RetrySchedule(), "relay.test"
        )
        await js.publish(result_subject(QUEUE_ID), b"{}")
        results = await js.pull_subscribe(
            result_subject(QUEUE_ID),
            RESULTS_CONSUMER,
            stream=RESULTS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
        )
        [message] = await results.fetch(1, timeout=5)
        nats_server.stop()
        with caplog.at_level(logging.WARNING, "kurrier.queue"):
            await _settle(manager, message, QUEUE_ID, _touch)
            swept = Heard("sweep")
            logging.getLogger("kurrier.queue.sweeper").addHandler(swept)
            sweeping = asyncio.create_task(Sweeper(js, manager).run())
            try:
                async with asyncio.timeout(60):
                    await swept.event.wait()
            finally:
                await cancel_and_wait(sweeping)
                logging.getLogger("kurrier.queue.sweeper").removeHandler(swept)
        [settle] = _logged(caplog, "could not update the record")
        [sweep] = _logged(caplog, "sweep")
        for entry in (settle, sweep):
            assert entry.levelno == logging.WARNING, entry.getMessage()
            assert "NATS or JetStream is away" in entry.getMessage()
            assert entry.exc_info is None
    finally:
        await disconnect(nc)
