"""The routing table the operator publishes into NATS, read back as JSON."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from kurrier.core.jetstream import CONFIG_BUCKET, ROUTING_TABLE_KEY, connect, disconnect
from kurrier.core.routing import RoutingTable
from nats.js.errors import KeyNotFoundError, NotFoundError

from tests.support.processes import wait_until


async def _routing_table(nats_url: str) -> dict[str, Any] | None:
    nc = await connect(nats_url, "test-inspector")
    try:
        kv = await nc.jetstream().key_value(CONFIG_BUCKET)
        entry = await kv.get(ROUTING_TABLE_KEY)
    except (KeyNotFoundError, NotFoundError):
        return None
    finally:
        await disconnect(nc)
    if not entry.value:
        return None
    # Stored without its defaults (the form older readers understand): read back
    # whole, as a service reads it, with the secrets still sealed.
    table: dict[str, Any] = RoutingTable.model_validate_json(entry.value).model_dump(mode="json")
    return table


def routing_table(nats_url: str) -> dict[str, Any] | None:
    """The published table as JSON, or None before the first publication."""
    return asyncio.run(_routing_table(nats_url))


def wait_for_table(
    nats_url: str, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20
) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def published() -> bool:
        table = routing_table(nats_url)
        if table is not None and condition(table):
            found.append(table)
            return True
        return False

    wait_until(published, timeout, what)
    return found[0]


def route_names(table: dict[str, Any]) -> list[str]:
    return [r["name"] for r in table["routes"]]
