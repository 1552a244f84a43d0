"""Publishing the table on a real NATS: revisions only go up, and only when the table changes."""

from __future__ import annotations

import asyncio

import yaml
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.core.loader import parse_documents
from kurrier.core.routing import RoutingTable, compile_table
from kurrier.core.table_store import publish_table

from tests.support.nats import NatsServer
from tests.support.relay import route


def _table(port: int) -> RoutingTable:
    document = yaml.safe_load(route("r", ["example.com"], port))
    table, _ = compile_table(parse_documents([document], "test"))
    return table


async def test_unchanged_tables_keep_their_revision(nats_server: NatsServer) -> None:
    nc = await connect(nats_server.url, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        assert await publish_table(js, _table(2526)) == 1
        assert await publish_table(js, _table(2526)) == 1
        assert await publish_table(js, _table(2527)) == 2
        assert await publish_table(js, _table(2526)) == 3
    finally:
        await disconnect(nc)


async def test_replicas_publishing_the_same_table_at_once_add_one_revision(
    nats_server: NatsServer,
) -> None:
    nc = await connect(nats_server.url, "test")
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        assert await publish_table(js, _table(2526)) == 1
        revisions = await asyncio.gather(*(publish_table(js, _table(2600)) for _ in range(5)))
        assert set(revisions) == {2}
    finally:
        await disconnect(nc)
