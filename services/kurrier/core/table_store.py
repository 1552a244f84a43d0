"""The routing table's home in NATS KV: publish a new revision, or follow the live one."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from kurrier.core.jetstream import CONFIG_BUCKET, ROUTING_TABLE_KEY, when_answered
from kurrier.core.metrics import ROUTING_TABLES_REFUSED
from kurrier.core.routing import RoutingTable
from kurrier.core.table_secrets import TableKeys, open_table, seal_table
from kurrier.core.telemetry import TRACER
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from opentelemetry.trace import Span, SpanKind
from pydantic import ValidationError

log = logging.getLogger(__name__)


@contextmanager
def publishing_table(table: RoutingTable) -> Iterator[Span]:
    """The span of publishing a compiled routing table (the operator's main act)."""
    with TRACER.start_as_current_span(
        "publish routing table",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": "kurrier-config",
            "kurrier.table.routes": len(table.routes),
            "kurrier.table.domains": len(table.domains),
        },
    ) as span:
        yield span


async def publish_table(
    js: JetStreamContext, table: RoutingTable, keys: TableKeys | None = None
) -> int:
    """Publish table (see _store_table) in a span, so each publish shows in traces; its
    secrets sealed with keys (default: those KURRIER_TABLE_KEYS names)."""
    with publishing_table(table) as span:
        revision = await _store_table(js, table, keys or TableKeys.from_environment())
        span.set_attribute("kurrier.table.revision", revision)
        return revision


async def _store_table(js: JetStreamContext, table: RoutingTable, keys: TableKeys) -> int:
    """Store table as the next revision (unless unchanged); returns the live revision.

    Safe against concurrent publishers.
    """
    kv = await js.key_value(CONFIG_BUCKET)
    while True:
        try:
            entry = await kv.get(ROUTING_TABLE_KEY)
        except KeyNotFoundError:
            entry = None
        previous = open_table(entry.value, keys) if entry and entry.value else None
        if previous is not None and previous.model_dump() == (
            table.model_copy(update={"revision": previous.revision}).model_dump()
        ):
            # Unchanged: operator replicas compiling the same objects add no revisions.
            return previous.revision
        revision = previous.revision + 1 if previous else 1
        document = seal_table(table.model_copy(update={"revision": revision}), keys)
        try:
            if entry is None:
                await kv.create(ROUTING_TABLE_KEY, document)
            else:
                await kv.update(ROUTING_TABLE_KEY, document, last=entry.revision)
        except KeyWrongLastSequenceError:
            continue  # another publisher won the race; recompute the revision on top of theirs
        return revision


class TableFollower:
    """Holds the live routing table; `run` swaps in each new revision whole, with the
    secrets keys (default: those KURRIER_TABLE_KEYS names) open."""

    def __init__(self, keys: TableKeys | None = None) -> None:
        self.table = RoutingTable()
        self.loaded = asyncio.Event()
        self._keys = keys or TableKeys.from_environment()

    async def run(self, js: JetStreamContext) -> None:
        async def watch() -> KeyValue.KeyWatcher:
            kv = await js.key_value(CONFIG_BUCKET)
            return await kv.watch(ROUTING_TABLE_KEY)

        watcher = await when_answered(watch, "the routing table's watch")
        async for entry in watcher:
            if entry is None or not entry.value:
                continue  # the end-of-history marker, or a deleted key: keep what we have
            try:
                table = open_table(entry.value, self._keys)
            except ValidationError as error:
                self._refuse(entry.value, error)
                continue
            if table.revision >= self.table.revision:
                self.table = table
                self.loaded.set()
                log.info("routing table revision %d in use", table.revision)

    def _refuse(self, stored: bytes, error: ValidationError) -> None:
        """Keep the table in use rather than apply part of one. A table with fields
        this version does not know uses a feature it cannot honour: a newer
        publisher's, while an upgrade rolls (docs/architecture.md, Contracts)."""
        problems = error.errors()
        unknown = sorted(
            {
                ".".join(str(part) for part in problem["loc"] if not isinstance(part, int))
                for problem in problems
                if problem["type"] == "extra_forbidden"
            }
        )
        kept = self.table.revision
        if unknown and all(problem["type"] == "extra_forbidden" for problem in problems):
            ROUTING_TABLES_REFUSED.add(1, {"reason": "newer"})
            log.error(
                "routing table revision %s uses fields this version does not know (%s): "
                "keeping revision %d until this pod is upgraded",
                _stored_revision(stored),
                ", ".join(unknown),
                kept,
            )
        else:
            ROUTING_TABLES_REFUSED.add(1, {"reason": "unreadable"})
            log.error("unreadable routing table; keeping revision %d: %s", kept, error)


def _stored_revision(stored: bytes) -> object:
    """The revision a stored table says it is, for the log; '?' when it says none."""
    try:
        document = json.loads(stored)
    except ValueError:
        return "?"
    return document.get("revision", "?") if isinstance(document, dict) else "?"
