"""The routing table between versions (docs/architecture.md, Contracts): stored without
the fields left at their defaults, and a table with fields a reader does not know
refused by that reader, which keeps its table and says so in its log and metrics.
What the previous release's pods make of this one's tables:
tests/faults/test_rolling_upgrade.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import yaml
from kurrier.core.jetstream import CONFIG_BUCKET, ROUTING_TABLE_KEY, connect, disconnect
from kurrier.core.loader import parse_documents
from kurrier.core.routing import compile_table
from kurrier.core.table_secrets import TableKeys, open_table, seal_table

from tests.support.metrics import value
from tests.support.nats import NatsServer
from tests.support.processes import wait_until
from tests.support.relay import ServiceRelay, documents, route, trusting


def _stored(config: str) -> dict[str, object]:
    table, problems = compile_table(parse_documents(yaml.safe_load_all(config), "test"))
    assert not problems, problems
    stored = seal_table(table.model_copy(update={"revision": 1}), TableKeys())
    assert open_table(stored, TableKeys()) == table.model_copy(update={"revision": 1})
    document: dict[str, object] = json.loads(stored)
    return document


def test_a_table_stores_only_what_differs_from_the_defaults() -> None:
    document = _stored(documents(route("r", ["example.com"], 2526), trusting("10.0.0.0/8")))
    assert document == {
        "revision": 1,
        "routes": [
            {
                "name": "r",
                "priority": 100,
                "recipient_domains": ["example.com"],
                "smarthost": ["127.0.0.1", 2526],
                "tls_mode": "none",
            }
        ],
        "policy": {"trusted_networks": ["10.0.0.0/8"]},
    }


async def _put(url: str, stored: bytes) -> None:
    nc = await connect(url, "test-publisher")
    try:
        kv = await nc.jetstream().key_value(CONFIG_BUCKET)
        await kv.put(ROUTING_TABLE_KEY, stored)
    finally:
        await disconnect(nc)


def test_a_table_with_unknown_fields_is_refused_and_the_last_one_kept(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    relay = ServiceRelay(tmp_path, nats_server.url, metrics=True)
    relay.publish(route("r", ["example.com"], 2526))
    relay.start("delivery")
    relay.wait_for_table("delivery")
    newer = _stored(route("r", ["example.com"], 2527))
    newer["revision"] = 2
    newer["policy"] = {"some_later_feature": True}
    asyncio.run(_put(nats_server.url, json.dumps(newer).encode()))
    port = relay.metrics_ports["delivery"]
    try:
        wait_until(
            lambda: value(port, "kurrier_routing_table_refused_total", reason="newer") == 1,
            30,
            "delivery to count the newer table it refused",
        )
    finally:
        relay.__exit__()
    log = (tmp_path / "delivery.log").read_text()
    assert (
        "routing table revision 2 uses fields this version does not know "
        "(policy.some_later_feature): keeping revision 1 until this pod is upgraded"
    ) in log
    assert "revision 2 in use" not in log
