"""Traffic shaping per destination site, across every delivery process together.

Each site (delivery/sites.py) has, in the NATS KV bucket kurrier-shaping:

- `<key>.connections`: one cluster slot (core/cluster_slots.py) per
  connection open to the site, busy or idle, held for CONNECTION_HOLD and
  renewed while the connection lives, so a killed process's slots free up
  within that time;
- `<key>.messages`: one slot per transaction started, held for a minute
  and never released: a sliding window of messages per minute;
- `<key>.pace`: the site's slow-down. A reply of 421 or 4.7.x (the codes
  receivers throttle with) halves the site's allowed connections and
  messages per minute, at most once per SLOWDOWN_GAP whatever the number of
  processes that saw it, down to one connection and a tenth of the rate;
  after RECOVERY_STEP without a throttling reply, each success gives back
  one connection and a tenth of the rate, until the configured limits are
  reached again. A site without limits of its own is slowed from its
  route's maxConnections, which then holds cluster-wide until it recovers;
- `<key>.site`: what the site is (its name, its limits, its route's
  maxConnections), rewritten every DESCRIBE_EVERY while it is used, so that
  `kurrier queue sites` (delivery/site_states.py) can say whose slots these are.

The pace is shared, so every process slows down together; each process
reads it at most once per PACE_CACHE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kurrier.core.cluster_slots import ClusterSlots, Hold
from kurrier.core.metrics import SITE_CONNECTION_LIMIT, SITE_MESSAGE_LIMIT, SITE_SLOWDOWNS
from kurrier.core.routing import CompiledRoute
from kurrier.core.smtp_text import enhanced_status, reply_code
from kurrier.delivery.sending_rate import MAX_WAIT, WINDOW
from kurrier.delivery.sites import Site
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

CONNECTION_HOLD = 15.0
# A connection holding a slot stays idle this long at most: another process
# may be waiting for the slot.
SLOT_IDLE_TIMEOUT = 1.0
SLOWDOWN_GAP = 5.0
RECOVERY_STEP = 10.0
PACE_CACHE = 1.0
# When a job held back because NATS did not answer is offered again.
NATS_RETRY = 5.0
# Well within the bucket's TTL: a site in use keeps its description.
DESCRIBE_EVERY = 600.0


def connections_key(site_key: str) -> str:
    return f"{site_key}.connections"


def messages_key(site_key: str) -> str:
    return f"{site_key}.messages"


def pace_key(site_key: str) -> str:
    return f"{site_key}.pace"


def description_key(site_key: str) -> str:
    return f"{site_key}.site"


class SiteBusy(Exception):
    """The site is at its limit for longer than a transaction may wait, or its
    slots cannot be read (NATS away): nothing is sent to it meanwhile."""

    def __init__(self, reply: str, retry_in: float) -> None:
        super().__init__(reply)
        self.reply = reply
        self.retry_in = retry_in


def _at_limit(site: Site, limit: str, retry_in: float) -> SiteBusy:
    return SiteBusy(f"451 4.7.0 site {site.name} is at its {limit} limit", retry_in)


@contextlib.asynccontextmanager
async def _failing_closed(site: Site) -> AsyncIterator[None]:
    """NATS trouble taking a slot holds the recipients back rather than raising: an
    attempt may have delivered others already, and its outcomes must be recorded."""
    try:
        yield
    except SiteBusy:
        raise
    except Exception as error:
        log.warning("cannot reach the slots of site %s: %r", site.name, error)
        raise SiteBusy(
            f"451 4.7.0 site {site.name}: its cluster-wide limits cannot be read", NATS_RETRY
        ) from error


def is_throttling(reply: str) -> bool:
    """Whether a reply asks the sender to slow down: 421, or any 4.7.x."""
    return reply_code(reply) == 421 or (
        reply.startswith("4") and enhanced_status(reply).startswith("4.7.")
    )


@dataclass(frozen=True)
class Pace:
    """A site's allowed connections and messages per minute while it is slowed down
    (since when it is, and when the pace last changed)."""

    connections: int
    per_minute: int | None
    changed: float
    since: float
    revision: int = 0

    def document(self) -> bytes:
        fields = {"connections": self.connections, "changed": self.changed, "since": self.since}
        if self.per_minute is not None:
            fields["per_minute"] = self.per_minute
        return json.dumps(fields).encode()


async def read_pace(kv: KeyValue, site_key: str) -> Pace | None:
    """The site's pace; None when it is not slowed down."""
    try:
        entry = await kv.get(pace_key(site_key))
    except KeyNotFoundError:
        return None
    fields = json.loads(entry.value or b"{}")
    return Pace(
        fields["connections"],
        fields.get("per_minute"),
        fields["changed"],
        fields.get("since", fields["changed"]),
        entry.revision or 0,
    )


@dataclass(frozen=True)
class Limits:
    connections: int | None
    per_minute: int | None


def in_force(site: Site, route_connections: int | None, pace: Pace | None) -> Limits:
    """The site's limits now: its own, lowered while it is slowed down (from its
    route's maxConnections when it has no connection limit of its own)."""
    if pace is None:
        return Limits(site.max_connections, site.per_minute)
    base_connections = site.max_connections or route_connections
    return Limits(
        min(pace.connections, base_connections or pace.connections),
        None
        if site.per_minute is None
        else min(pace.per_minute or site.per_minute, site.per_minute),
    )


def description(site: Site, route_connections: int) -> bytes:
    """The `<key>.site` document: what site_states needs to know of a site."""
    fields = {
        "name": site.name,
        "max_connections": site.max_connections,
        "per_minute": site.per_minute,
        "route_connections": route_connections,
    }
    return json.dumps(fields, separators=(",", ":")).encode()


def _rate_step(base: int) -> int:
    return max(1, base // 10)


class SiteShaping:
    def __init__(
        self,
        kv: KeyValue,
        *,
        max_wait: float = MAX_WAIT,
        connection_hold: float = CONNECTION_HOLD,
        slowdown_gap: float = SLOWDOWN_GAP,
        recovery_step: float = RECOVERY_STEP,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._kv = kv
        self._slots = ClusterSlots(kv, clock)
        self._clock = clock
        self._max_wait = max_wait
        self._connection_hold = connection_hold
        self._slowdown_gap = slowdown_gap
        self._recovery_step = recovery_step
        # Per site key: the pace as last read (None: not slowed), and when it was read.
        self._paces: dict[str, tuple[Pace | None, float]] = {}
        # Per site key: what its description was written from (the site and
        # its route's connections), and when.
        self._described: dict[str, tuple[Site, int, float]] = {}
        self._connections: set[Hold] = set()

    @staticmethod
    def _base(site: Site, route: CompiledRoute) -> Limits:
        return Limits(site.max_connections or route.max_connections, site.per_minute)

    async def _pace(self, site: Site, fresh: bool = False) -> Pace | None:
        cached = self._paces.get(site.key)
        now = time.monotonic()
        if cached is not None and not fresh and now - cached[1] < PACE_CACHE:
            return cached[0]
        pace = await read_pace(self._kv, site.key)
        self._paces[site.key] = (pace, now)
        return pace

    async def _describe(self, site: Site, route: CompiledRoute) -> None:
        # Compared by what the document is made of: building it for every
        # message would cost more than the rest of the check.
        written = self._described.get(site.key)
        now = time.monotonic()
        if (
            written is not None
            and written[:2] == (site, route.max_connections)
            and now - written[2] < DESCRIBE_EVERY
        ):
            return
        await self._kv.put(description_key(site.key), description(site, route.max_connections))
        self._described[site.key] = (site, route.max_connections, now)

    async def limits(self, site: Site, route: CompiledRoute) -> Limits:
        """The site's limits now: its own, lowered while it is slowed down."""
        await self._describe(site, route)
        limits = in_force(site, route.max_connections, await self._pace(site))
        if limits.connections is not None:
            SITE_CONNECTION_LIMIT.set({"site": site.name}, limits.connections)
        if limits.per_minute is not None:
            SITE_MESSAGE_LIMIT.set({"site": site.name}, limits.per_minute)
        return limits

    async def connection(self, site: Site, route: CompiledRoute) -> Hold | None:
        """One of the site's connection slots (None: the site has no connection limit).

        Raises SiteBusy when none is free within the wait.
        """
        async with _failing_closed(site):
            limit = (await self.limits(site, route)).connections
            if limit is None:
                return None
            hold = await self._slots.take(
                connections_key(site.key), limit, self._connection_hold, self._max_wait
            )
        if hold is None:
            raise _at_limit(site, "connection", self._max_wait)
        self._connections.add(hold)
        return hold

    async def wanted(self, hold: Hold) -> bool:
        """Whether another connection waits for the slot hold is on: then it is not kept idle."""
        try:
            return await self._slots.wanted(hold.name)
        except Exception as error:
            log.warning("could not read the queue for %s: %r", hold.name, error)
            return False

    async def closed(self, hold: Hold) -> None:
        self._connections.discard(hold)
        try:
            await self._slots.release(hold)
        except Exception as error:
            # Not renewed any more, the slot frees itself within CONNECTION_HOLD.
            log.warning("could not release a connection slot of %s: %r", hold.name, error)

    async def message(self, site: Site, route: CompiledRoute) -> None:
        """Take one of the site's messages of the minute; SiteBusy when none comes in time."""
        async with _failing_closed(site):
            limit = (await self.limits(site, route)).per_minute
            if limit is None:
                return
            taken = await self._slots.take(messages_key(site.key), limit, WINDOW, self._max_wait)
        if taken is None:
            raise _at_limit(site, "messages per minute", self._max_wait)

    async def throttled(self, site: Site, route: CompiledRoute, reply: str) -> None:
        """The site answered with a throttling reply: halve its pace (once per gap).

        Like succeeded, it comes after a transaction: NATS trouble is logged, never
        raised, as the attempt must be recorded whatever the pace."""
        try:
            await self._slow_down(site, route, reply)
        except Exception as error:
            log.warning("could not slow site %s down: %r", site.name, error)

    async def succeeded(self, site: Site, route: CompiledRoute) -> None:
        """A transaction went through: a slowed site gets some of its pace back."""
        try:
            await self._speed_up(site, route)
        except Exception as error:
            log.warning("could not speed site %s up: %r", site.name, error)

    async def _slow_down(self, site: Site, route: CompiledRoute, reply: str) -> None:
        pace = await self._pace(site, fresh=True)
        now = self._clock()
        if pace is not None and now - pace.changed < self._slowdown_gap:
            return
        base = self._base(site, route)
        assert base.connections is not None
        current = pace or Pace(base.connections, base.per_minute, now, now)
        slower = Pace(
            max(1, current.connections // 2),
            None
            if base.per_minute is None
            else max(_rate_step(base.per_minute), (current.per_minute or base.per_minute) // 2),
            now,
            current.since,
        )
        if await self._store_pace(site, slower, pace):
            SITE_SLOWDOWNS.add(1, {"site": site.name})
            log.warning(
                "site %s is throttling (%s): down to %d connections%s",
                site.name,
                reply,
                slower.connections,
                f", {slower.per_minute} messages per minute" if slower.per_minute else "",
            )

    async def _speed_up(self, site: Site, route: CompiledRoute) -> None:
        pace = await self._pace(site)
        if pace is None or self._clock() - pace.changed < self._recovery_step:
            return
        base = self._base(site, route)
        assert base.connections is not None
        faster = Pace(
            pace.connections + 1,
            None
            if base.per_minute is None
            else (pace.per_minute or base.per_minute) + _rate_step(base.per_minute),
            self._clock(),
            pace.since,
        )
        recovered = faster.connections >= base.connections and (
            base.per_minute is None or (faster.per_minute or 0) >= base.per_minute
        )
        if recovered:
            await self._clear_pace(site, pace)
            log.info("site %s is back at its full pace", site.name)
        elif await self._store_pace(site, faster, pace):
            log.info("site %s speeds up to %d connections", site.name, faster.connections)

    async def _store_pace(self, site: Site, pace: Pace, read: Pace | None) -> bool:
        """Write pace over the one read; False when another process changed it meanwhile."""
        key = pace_key(site.key)
        try:
            if read is None:
                await self._kv.create(key, pace.document())
            else:
                await self._kv.update(key, pace.document(), last=read.revision)
        except KeyWrongLastSequenceError:
            return False
        finally:
            self._paces.pop(site.key, None)
        return True

    async def _clear_pace(self, site: Site, read: Pace) -> None:
        try:
            await self._kv.delete(pace_key(site.key), last=read.revision)
        except KeyWrongLastSequenceError:
            pass
        finally:
            self._paces.pop(site.key, None)

    async def run_renewal(self) -> None:
        """Keep the slots of this process's open connections held while they are open."""
        while True:
            await asyncio.sleep(self._connection_hold / 3)
            holds = list(self._connections)
            if not holds:
                continue
            try:
                for lost in await self._slots.renew(holds, self._connection_hold):
                    log.warning("connection slot of %s expired before it was renewed", lost.name)
            except Exception as error:
                # NATS away for a moment: the next round renews, or the slots expire.
                log.warning("could not renew connection slots: %r", error)
