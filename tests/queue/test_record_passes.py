"""A pass over the message bucket sees every record, every time.

nats-py's KV watcher can decide that the bucket is empty before the records
it is already being sent arrive (about one pass in 75 over 51 records, on a
2-core machine on 2026-11-30); a pass built on it would let the depth gauge
say 0, `kurrier queue list` show an empty queue and the sweeper skip a round.
A pass is therefore a pull consumer, and this test holds it to every record.
"""

from __future__ import annotations

import asyncio
import time

from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.core.message import MessageRecord, RecipientState
from kurrier.core.records import RecordStore

from tests.support.nats import NatsServer

RECORDS = 51
PASSES = 600


async def _pass_sizes(nats_url: str) -> tuple[set[int], set[int]]:
    nc = await connect(nats_url, "test-record-passes")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        records = await RecordStore.open(js)
        empty = {len([r async for r in records.all()])}
        for n in range(RECORDS):
            await records.create(
                MessageRecord(
                    queue_id=f"PASS{n:016d}",
                    mail_from="a@client.test",
                    recipients=[RecipientState(address="r@example.com")],
                    received_at=time.time(),
                    size=1,
                    body_store="stream",
                )
            )
        # One removed: its purge marker is not a record.
        await records.delete(f"PASS{0:016d}")
        sizes = {len([r async for r in records.all()]) for _ in range(PASSES)}
        return empty, sizes
    finally:
        await disconnect(nc)


def test_every_pass_over_the_bucket_sees_every_record(nats_server: NatsServer) -> None:
    empty, sizes = asyncio.run(_pass_sizes(nats_server.url))
    assert empty == {0}
    assert sizes == {RECORDS - 1}
