"""Crash windows the queue must heal by itself: a record stored whose job never went out."""

from __future__ import annotations

import asyncio
import io
import smtplib
import time
from pathlib import Path

from kurrier.core.body_store import store_body
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.core.message import MessageRecord, RecipientState
from kurrier.queue.records import RecordStore

from tests.support.nats import NatsServer
from tests.support.processes import wait_until
from tests.support.relay import ServiceRelay, documents, queued_count, route, trusting
from tests.support.sink import Sink


async def _orphan_record(nats_url: str, queue_id: str, body: bytes) -> None:
    """What a queue crash between storing the record and publishing its job leaves behind."""
    nc = await connect(nats_url, "test-crash")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        where = await store_body(js, queue_id, io.BytesIO(body), len(body))
        lease_ran_out = time.time() - 3600
        record = MessageRecord(
            queue_id=queue_id,
            mail_from="a@client.test",
            recipients=[
                RecipientState(address="r@example.com", attempts=1, next_attempt=lease_ran_out)
            ],
            received_at=lease_ran_out,
            size=len(body),
            body_store=where,
            dispatches=1,
        )
        assert await (await RecordStore.open(js)).create(record)
    finally:
        await disconnect(nc)


def test_a_record_whose_job_was_lost_is_swept_and_delivered(
    tmp_path: Path, sink: Sink, nats_server: NatsServer
) -> None:
    body = b"Subject: orphan\r\n\r\nlost job\r\n"
    asyncio.run(_orphan_record(nats_server.url, "ORPHAN0000000000001", body))
    relay = ServiceRelay(tmp_path, nats_server.url)
    relay.publish(documents(route("r", ["example.com"], sink.port), trusting("127.0.0.0/8")))
    with relay:
        [delivered] = sink.wait_for(1, timeout=60)
        wait_until(lambda: queued_count(nats_server.url) == 0, 30, "the queue to drain")
        # And the relay still takes new mail normally afterwards.
        with smtplib.SMTP("127.0.0.1", relay.smtp_port) as smtp:
            smtp.sendmail("a@client.test", ["r@example.com"], b"Subject: fresh\r\n\r\nx\r\n")
        sink.wait_for(2)
    assert delivered.content == body
