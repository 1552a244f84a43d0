"""A route that is gone or unusable when a job is delivered: the mail waits, it is not lost.

compile_table and the relay policy judge routes when mail arrives; this is
the other moment, delivery, against the table live *then*. A recipient no
route matches any more, or whose route has a `problem` (its auth Secret
missing), is deferred with a reply that says which, retried on the queue's
backoff, never bounced nor sent along another route; once the table has a
usable route again it is delivered.

Everything is real and in one process: nats-server, the queue's intake,
results and due consumers, the delivery worker following the table in KV,
the sink.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable

import yaml
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.core.lifecycle import cancel_and_wait
from kurrier.core.loader import parse_documents
from kurrier.core.message import FINAL_STATUSES, MessageRecord, RecipientState, new_queue_id
from kurrier.core.records import RecordStore
from kurrier.core.routing import RoutingTable, compile_table
from kurrier.core.table_store import TableFollower, publish_table
from kurrier.delivery.settings import DeliverySettings
from kurrier.delivery.worker import DeliveryWorker
from kurrier.queue.consumers import run_due, run_results
from kurrier.queue.manager import QueueManager
from kurrier.queue.retry_schedule import RetrySchedule
from nats.js import JetStreamContext

from tests.support.nats import NatsServer
from tests.support.relay import route
from tests.support.sink import Sink

UNROUTED = "a@example.com"
BROKEN = "b@broken.test"
AUTHED_ROUTE = """
apiVersion: kurrier.io/v1alpha1
kind: RelayRoute
metadata: {name: authed}
spec:
  match: {recipientDomains: [broken.test]}
  destination: {smarthost: {host: 127.0.0.1, port: PORT}}
  tls: {mode: required}
  auth: {secretRef: {name: relay-creds}}
"""
NO_ROUTE = "451 4.4.0 no route matches the recipient domain"
UNUSABLE = "451 4.3.5 route authed is unusable: auth Secret 'relay-creds' not found"
SCHEDULE = RetrySchedule(min_backoff=0.5, max_backoff=1.0)
BODY = b"From: a@client.test\r\nSubject: waits for its route\r\n\r\nbody\r\n"


def _table(*documents: str) -> RoutingTable:
    table, _ = compile_table(parse_documents([yaml.safe_load(d) for d in documents], "test"))
    return table


async def _until(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _record(records: RecordStore, queue_id: str) -> MessageRecord | None:
    found = await records.get(queue_id, fresh=True)
    return found[0] if found else None


async def _published(js: JetStreamContext, tables: TableFollower, table: RoutingTable) -> None:
    revision = await publish_table(js, table)
    await _until(lambda: tables.table.revision >= revision, "the table to be followed")


async def _scenario(nats_url: str, sink: Sink) -> tuple[list[tuple[str, str, int]], int]:
    nc = await connect(nats_url, "test-route-at-delivery")
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        tables = TableFollower()
        tasks.append(asyncio.create_task(tables.run(js)))
        # The live table: example.com has no route; broken.test's route lacks its Secret.
        await _published(
            js,
            tables,
            _table(
                route("elsewhere", ["other.test"], sink.port),
                AUTHED_ROUTE.replace("PORT", str(sink.port)),
            ),
        )
        assert tables.table.route_for("broken.test") is not None
        assert tables.table.route_for("broken.test").problem  # type: ignore[union-attr]
        records = await RecordStore.open(js)
        manager = QueueManager(js, records, tables, SCHEDULE, "relay.test")
        queue_id = new_queue_id()
        template = MessageRecord(
            queue_id=queue_id,
            mail_from="a@client.test",
            recipients=[RecipientState(address=r) for r in (UNROUTED, BROKEN)],
            received_at=0,
            size=0,
            body_store="stream",
        )
        assert await manager.intake.accept(template, io.BytesIO(BODY), len(BODY))
        worker = DeliveryWorker(js, tables, DeliverySettings(helo_name="relay.test"), nc=nc)
        tasks += [
            asyncio.create_task(worker.run(stop)),
            asyncio.create_task(run_results(js, manager)),
            asyncio.create_task(run_due(js, manager)),
        ]

        # Deferred, retried and deferred again: three attempts each, the message kept.
        seen: list[MessageRecord | None] = [None]

        async def attempted_three_times() -> bool:
            seen[0] = record = await _record(records, queue_id)
            assert record is not None, "the message was lost"
            assert not any(t.done() for t in tasks), "a consumer ended"
            final = [(r.address, r.status) for r in record.recipients if r.status in FINAL_STATUSES]
            assert not final, f"finished while it had no usable route: {final}"
            return all(r.attempts >= 3 and r.status == "deferred" for r in record.recipients)

        deadline = time.monotonic() + 60
        while not await attempted_three_times():
            assert time.monotonic() < deadline, f"not retried: {seen[0]}"
            await asyncio.sleep(0.05)
        assert seen[0] is not None
        waiting = [(r.address, r.last_reply, r.attempts) for r in seen[0].recipients]
        statuses = {a.reply for r in seen[0].recipients for a in r.history}
        sent_meanwhile = len(sink.messages)

        # A usable route appears: the next retry delivers both.
        await _published(
            js, tables, _table(route("fixed", ["example.com", "broken.test"], sink.port))
        )
        await _until(
            lambda: {r for m in sink.messages for r in m.recipients} == {UNROUTED, BROKEN},
            "both recipients at the sink",
        )
        deadline = time.monotonic() + 30
        while [record async for record in records.all()]:
            assert time.monotonic() < deadline, "the message was not finished"
            await asyncio.sleep(0.05)
        assert statuses == {NO_ROUTE, UNUSABLE}, statuses
        return waiting, sent_meanwhile
    finally:
        stop.set()
        await cancel_and_wait(*tasks)
        await disconnect(nc)


def test_a_route_gone_or_unusable_at_delivery_defers_until_it_is_back(
    nats_server: NatsServer, sink: Sink
) -> None:
    waiting, sent_meanwhile = asyncio.run(_scenario(nats_server.url, sink))
    assert sorted((address, reply) for address, reply, _ in waiting) == [
        (UNROUTED, NO_ROUTE),
        (BROKEN, UNUSABLE),
    ]
    # Not sent anywhere while it waited (no other route took it), nor bounced to the sender.
    assert sent_meanwhile == 0
    assert len(sink.messages) in (1, 2)
    assert all(m.mail_from == "a@client.test" for m in sink.messages)
