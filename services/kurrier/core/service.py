"""One skeleton for the long-running services, in the spirit of Postfix's single_server.

`serve` does, once and in one order, what every service needs: connect to
NATS, create the JetStream streams it may create and wait for the others it
uses (kurrier.core.nats_access), publish the messages' history
(core/history.py), follow the routing table, build the service
(its `start` hook), serve /healthz and /metrics, wait for the first routing
table when the service needs it, open to clients, run until SIGTERM or SIGINT,
drain in the service's order, close, disconnect. A service declares a
`Service` and returns `Hooks` from its start hook; it does none of the above.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kurrier.core.history import HISTORY
from kurrier.core.http_endpoint import Document, HttpEndpoint, Refresh
from kurrier.core.jetstream import (
    HistoryLimits,
    connect,
    disconnect,
    ensure_layout,
    wait_for_layout,
    when_answered,
)
from kurrier.core.lifecycle import (
    cancel_and_wait,
    ended_unexpectedly,
    run_until,
    stop_event,
    unless_stopped,
)
from kurrier.core.metrics import NATS_CONNECTED
from kurrier.core.nats_access import streams_created, streams_used
from kurrier.core.table_store import TableFollower
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

Step = Callable[[], Awaitable[None]]
Job = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Connected:
    """What the skeleton hands a service's start hook."""

    nc: NATS
    js: JetStreamContext
    # The live routing table (followed unless the service says it needs none).
    tables: TableFollower
    # Set by SIGTERM or SIGINT: for a `main` hook that finishes its work in hand first.
    stop: asyncio.Event


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Hooks:
    """What a service brings to the skeleton, built by its start hook."""

    # Opens the service to clients (binds its ports), once the first table is in.
    open: Step | None = None
    # Run from opening until stop, then cancelled; one that ends brings the process down.
    tasks: Sequence[Job] = ()
    # Runs from opening until it returns: it watches `stop` (or the signals)
    # itself and finishes what it holds first. Its return ends the service.
    main: Job | None = None
    # Run from the start until the drain is done; one that ends before stop
    # brings the process down.
    helpers: Sequence[Job] = ()
    # After stop, in this order; only if the service opened.
    drain: Sequence[Step] = ()
    # Last, whatever happened, before NATS is disconnected.
    close: Sequence[Step] = ()
    # /healthz, besides a connected NATS.
    healthy: Callable[[], bool] = _always
    # Brings gauges counted on demand up to date before /metrics.
    refresh_metrics: Refresh | None = None
    # JSON documents served beside /metrics, by path.
    documents: Mapping[str, Document] = field(default_factory=dict)


@dataclass(frozen=True)
class FirstTable:
    """Before opening, wait for the first routing table: until it comes (timeout None),
    or that long and then go on with an empty one. `before` says, for the log, what waits."""

    before: str
    timeout: float | None = None


@dataclass(frozen=True)
class Service:
    """A service, as the skeleton runs it."""

    name: str  # on NATS: kurrier-<name>
    nats_url: str
    replicas: int
    metrics_listen: str | None
    start: Callable[[Connected], Awaitable[Hooks]]
    # Converges existing streams and buckets to its replicas and limits (the queue).
    owns_layout: bool = False
    body_store_limit: int | None = None
    history: HistoryLimits | None = None
    follows_table: bool = True
    first_table: FirstTable | None = None
    # Its main hook handles SIGTERM and SIGINT itself (kopf does).
    own_signals: bool = False


async def serve(service: Service) -> None:
    """Run the service from connecting to NATS to disconnecting (the module's docstring)."""
    stop = asyncio.Event() if service.own_signals else stop_event()
    nc = await connect(service.nats_url, f"kurrier-{service.name}")
    NATS_CONNECTED.follow(lambda: int(nc.is_connected))
    helpers: list[asyncio.Task[None]] = []
    hooks = Hooks()
    try:
        js = nc.jetstream()
        laid_out = when_answered(lambda: _lay_out(js, service), "the streams' layout")
        if not await unless_stopped(stop, laid_out):
            return
        helpers.append(asyncio.create_task(HISTORY.run(js, service.name), name="history"))
        tables = TableFollower()
        if service.follows_table:
            helpers.append(asyncio.create_task(tables.run(js), name="routing table"))
        hooks = await service.start(Connected(nc, js, tables, stop))
        helpers += [asyncio.create_task(helper()) for helper in hooks.helpers]
        if service.metrics_listen:
            healthy = hooks.healthy
            endpoint = HttpEndpoint(
                lambda: healthy() and nc.is_connected,
                refresh=hooks.refresh_metrics,
                documents=hooks.documents,
            )
            await endpoint.serve(service.metrics_listen)
        if service.first_table is not None:
            await _wait_for_first_table(tables, service.first_table, stop, helpers)
        if not stop.is_set():
            try:
                if hooks.open is not None:
                    await hooks.open()
                await run_until(
                    stop,
                    *(task() for task in hooks.tasks),
                    main=hooks.main() if hooks.main is not None else None,
                    watching=helpers,
                )
            finally:
                for step in hooks.drain:
                    await step()
    finally:
        await cancel_and_wait(*helpers)
        for step in hooks.close:
            await step()
        await disconnect(nc)


async def _lay_out(js: JetStreamContext, service: Service) -> bool:
    """Create the streams the service may create and wait for the others it uses."""
    created = streams_created(service.name)
    await ensure_layout(
        js,
        service.replicas,
        owner=service.owns_layout,
        body_store_limit=service.body_store_limit,
        streams=created,
        history=service.history,
    )
    await wait_for_layout(js, streams_used(service.name) - created)
    return True


async def _wait_for_first_table(
    tables: TableFollower,
    first: FirstTable,
    stop: asyncio.Event,
    helpers: Sequence[asyncio.Task[None]],
) -> None:
    if tables.loaded.is_set():
        return
    log.info("waiting for the first routing table before %s", first.before)
    waits = [asyncio.create_task(tables.loaded.wait()), asyncio.create_task(stop.wait())]
    try:
        done, _ = await asyncio.wait(
            [*waits, *helpers], timeout=first.timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for wait in waits:
            wait.cancel()
    if not done:
        log.warning("no routing table published yet; %s with an empty one", first.before)
    for helper in helpers:
        if helper in done:
            ended_unexpectedly(helper)
