"""One loop: whenever the watched objects change, compile the whole table, publish it, write status.

Level-based, not edge-based: every pass starts from everything the watches
hold, so a missed or reordered event cannot leave the table wrong, and
several operator replicas compile the same table from the same objects (the
publisher skips an unchanged table, so they do not churn revisions).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kurrier.core.routing import Problem, compile_table
from kurrier.core.table_store import publish_table
from kurrier.operator.apiserver import ApiError, ApiServer
from kurrier.operator.cluster_objects import (
    Identity,
    Key,
    ObservedObject,
    StoredSecret,
    referenced_secrets,
    relay_resources,
    secret_resources,
    status_details,
)
from kurrier.operator.dkim_dns import DKIM_PUBLISHED, DkimDnsCheck
from kurrier.operator.status import (
    STATUS_MODELS,
    StatusChange,
    Verdict,
    next_status,
    read_status,
    verdict,
)
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

# While no watch event has arrived, how often to ask whether there is simply nothing to watch.
FIRST_SYNC_POLL = 2.0
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class ClusterView:
    """What the watches hold right now: relay objects and Secrets."""

    objects: Callable[[], list[ObservedObject]]
    secrets: Callable[[], Mapping[Key, StoredSecret]]


class Reconciler:
    def __init__(
        self,
        js: JetStreamContext,
        api: ApiServer,
        namespaces: Sequence[str],
        dkim_check: DkimDnsCheck | None = None,
        platform_namespace: str = "",
    ) -> None:
        self._js = js
        self._platform_namespace = platform_namespace
        self._dkim_check = dkim_check
        self._next_check: asyncio.TimerHandle | None = None
        self._api = api
        self._namespaces = namespaces
        self._view: ClusterView | None = None
        self._wanted = asyncio.Event()
        self._referenced: set[Key] = set()
        # The resourceVersion each status write of ours went over: until the
        # watch delivers that write (a newer version), the object is not
        # written again, or a quick second pass would repeat it and its Event.
        self._written: dict[Identity, str] = {}
        self._reported: set[Problem] = set()
        self._compiled: dict[Identity, int] = {}  # generations the last pass compiled
        self._failures = 0
        self.revision = 0
        self.synced = False

    def notice_object(self, view: ClusterView, identity: Identity, generation: int) -> None:
        """A relay object was added, changed or deleted (generation 0): reconcile soon.

        Changes that leave the generation alone (our own status writes, labels)
        change nothing to compile; they are not worth a pass. Besides saving
        work, this keeps a replica that is behind on events from republishing
        an older table merely because it saw another replica's status write.
        """
        self._view = view
        if self._compiled.get(identity) != generation:
            self._wanted.set()  # many events coalesce into one pass

    def notice_secret(self, view: ClusterView, key: Key) -> None:
        self._view = view
        if key in self._referenced:
            self._wanted.set()

    async def run(self) -> None:
        while True:
            if self._view is None and not self.synced:
                # An empty cluster sends no events, yet its (empty) table must be published.
                try:
                    if await self._api.nothing_declared(self._namespaces):
                        self._wanted.set()
                except ApiError as error:
                    log.warning("cannot list relay resources: %s", error)
                try:
                    async with asyncio.timeout(FIRST_SYNC_POLL):
                        await self._wanted.wait()
                except TimeoutError:
                    continue
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.reconcile()
                self._failures = 0
            except (ApiError, NatsError, TimeoutError, OSError) as error:
                delay = RETRY_DELAYS[min(self._failures, len(RETRY_DELAYS) - 1)]
                self._failures += 1
                log.error("reconcile failed, retrying in %.1fs: %s", delay, error)
                asyncio.get_running_loop().call_later(delay, self._wanted.set)

    async def reconcile(self) -> None:
        objects = self._view.objects() if self._view else []
        secrets = self._view.secrets() if self._view else {}
        resources, problems = relay_resources(objects)
        self._compiled = {o.identity: o.generation for o in objects}
        self._referenced = referenced_secrets(resources.values())
        referenced = secret_resources(secrets, self._referenced)
        table, compile_problems = compile_table(
            [*resources.values(), *referenced], platform_namespace=self._platform_namespace
        )
        revision = await publish_table(self._js, table)
        if revision != self.revision:
            log.info(
                "routing table revision %d: %d routes, %d domains",
                revision,
                len(table.routes),
                len(table.domains),
            )
        self.revision = revision
        self.synced = True
        by_object: dict[Identity, list[Problem]] = defaultdict(list)
        for problem in [*problems, *compile_problems]:
            by_object[(problem.kind, problem.namespace, problem.name)].append(problem)
            if problem not in self._reported:  # once, not on every later pass
                log.warning(
                    "%s %s/%s: %s", problem.kind, problem.namespace, problem.name, problem.message
                )
        self._reported = {*problems, *compile_problems}
        details = {
            o.identity: status_details(o.kind, resources.get(o.identity), referenced)
            for o in objects
        }
        published = await self._check_dns(details)
        now = datetime.now(UTC)
        present = set()
        for observed in objects:
            present.add(observed.identity)
            model = STATUS_MODELS[observed.kind]
            found = published.get(observed.identity)
            change = next_status(
                read_status(observed.status, model),
                observed.generation,
                verdict(by_object[observed.identity]),
                revision,
                now,
                model,
                details[observed.identity],
                {DKIM_PUBLISHED: found} if found else None,
            )
            if change is not None:
                await self._write(observed, change)
        self._written = {k: v for k, v in self._written.items() if k in present}

    async def _check_dns(self, details: dict[Identity, dict[str, Any]]) -> dict[Identity, Verdict]:
        """Each signing domain's DkimPublished verdict; asked again every check interval,
        since DNS changes send no events."""
        wanted = {k: d["dkimRecords"] for k, d in details.items() if d.get("dkimRecords")}
        if self._dkim_check is None or not wanted:
            return {}
        if self._next_check is not None:
            self._next_check.cancel()
        self._next_check = asyncio.get_running_loop().call_later(
            self._dkim_check.interval, self._wanted.set
        )
        return await self._dkim_check.verdicts(wanted)

    async def _write(self, observed: ObservedObject, change: StatusChange) -> None:
        if self._written.get(observed.identity) == observed.resource_version:
            return
        try:
            await self._api.patch_status(observed, change.status.model_dump(mode="json"))
        except ApiError as error:
            if error.status == 404:
                return  # deleted meanwhile; its DELETED event brings the next pass
            raise
        self._written[observed.identity] = observed.resource_version
        for event in change.events:
            try:
                await self._api.record_event(observed, event)
            except ApiError as error:
                # An Event is a courtesy; the status already says it all.
                log.warning("could not record an Event for %s: %s", observed.name, error)
