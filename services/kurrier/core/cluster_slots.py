"""Slots shared by every process of the cluster: at most `limit` holds on a name at once.

One key of a NATS KV bucket per name holds its holds and when each ends.
Every change is a compare-and-set on the key's revision, so two processes
racing for the last slot cannot both get it; the loser reads again. A hold
ends when its holder releases it or when its time is up, so a process that
is killed frees its slots by itself:

- a slot held for as long as something lasts (an open connection) is
  taken for a short time and renewed by its holder while it lasts;
- a slot never released and held for a window (a message sent) makes
  `limit` per window a sliding-window rate.

Slots go first come, first served: a process that finds every slot held
queues for one (its place in the queue is kept while it keeps asking), and
holders can see that someone waits (`wanted`), so that a connection is
closed rather than kept idle while another process needs its slot.

Times are wall-clock (Unix) times written by each process; Kubernetes
nodes' clocks agree to well under a second, which is all the precision the
holds need. The bucket's TTL removes the keys of names no longer used.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

# Between polls of a full name: short at first (a slot is often freed soon), then less often.
FIRST_POLL = 0.05
LONGEST_POLL = 1.0
# A place in the queue not asked for again within this long is given up.
WAITING_TTL = 3 * LONGEST_POLL


@dataclass(frozen=True)
class Hold:
    name: str
    holder: str


@dataclass
class _State:
    """A name's holds (holder: until) and its queue (waiter: (since, until)), as read."""

    holds: dict[str, float]
    waiting: dict[str, tuple[float, float]]
    revision: int

    def queue(self) -> list[str]:
        return sorted(self.waiting, key=lambda waiter: self.waiting[waiter][0])

    def document(self) -> bytes:
        fields = {"holds": self.holds, "waiting": self.waiting}
        return json.dumps(fields, separators=(",", ":")).encode()


class ClusterSlots:
    def __init__(self, kv: KeyValue, clock: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self._clock = clock
        # Unique per instance: a process may share names through several.
        self._prefix = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}:"
        self._serial = itertools.count(1)

    def _new_id(self) -> str:
        return f"{self._prefix}{next(self._serial)}"

    async def _read(self, name: str) -> _State:
        """What still runs on name (ended holds and given-up places dropped)."""
        try:
            entry = await self._kv.get(name)
        except KeyNotFoundError:
            return _State({}, {}, 0)
        if not entry.value:
            return _State({}, {}, entry.revision or 0)
        now = self._clock()
        fields = json.loads(entry.value)
        return _State(
            {holder: until for holder, until in fields["holds"].items() if until > now},
            {
                waiter: (since, until)
                for waiter, (since, until) in fields["waiting"].items()
                if until > now
            },
            entry.revision or 0,
        )

    async def _write(self, name: str, state: _State) -> bool:
        """Store state if name is still at its revision; False when another process came first."""
        try:
            if state.revision == 0:
                await self._kv.create(name, state.document())
            else:
                await self._kv.update(name, state.document(), last=state.revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def _try_take(
        self, name: str, limit: int, hold_for: float, waiter: str | None
    ) -> Hold | float:
        while True:
            state = await self._read(name)
            now = self._clock()
            free = limit - len(state.holds)
            queue = state.queue()
            ahead = queue.index(waiter) if waiter in queue else len(queue)
            if ahead < free:
                holder = self._new_id()
                state.holds[holder] = now + hold_for
                state.waiting.pop(waiter or "", None)
                if await self._write(name, state):
                    return Hold(name, holder)
                continue
            wait = max(0.0, min(state.holds.values()) - now) if state.holds else FIRST_POLL
            if waiter is None:
                return wait
            since = state.waiting.get(waiter, (now, 0.0))[0]
            state.waiting[waiter] = (since, now + WAITING_TTL)
            if await self._write(name, state):
                return wait

    async def try_take(self, name: str, limit: int, hold_for: float) -> Hold | float:
        """A hold on one of name's limit slots for hold_for seconds, or, none being
        free for a newcomer, the seconds until the first hold ends (if not released sooner)."""
        return await self._try_take(name, limit, hold_for, None)

    async def take(self, name: str, limit: int, hold_for: float, max_wait: float) -> Hold | None:
        """A hold as try_take, queueing up to max_wait seconds for a slot; None if none came."""
        deadline = time.monotonic() + max_wait
        waiter = self._new_id()
        poll = FIRST_POLL
        while True:
            taken = await self._try_take(name, limit, hold_for, waiter)
            if isinstance(taken, Hold):
                return taken
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._leave(name, waiter)
                return None
            # Released slots are noticed by polling: a watch per waiting name costs more.
            await asyncio.sleep(min(taken, poll, remaining))
            poll = min(poll * 2, LONGEST_POLL)

    async def _leave(self, name: str, waiter: str) -> None:
        """Give up a place in name's queue, so that it holds up nobody behind it."""
        while True:
            state = await self._read(name)
            if state.waiting.pop(waiter, None) is None or await self._write(name, state):
                return

    async def wanted(self, name: str) -> bool:
        """Whether a process is queueing for one of name's slots."""
        return bool((await self._read(name)).waiting)

    async def renew(self, holds: list[Hold], hold_for: float) -> list[Hold]:
        """Extend holds by hold_for seconds from now; returns those that had already
        ended (taken over by then, they no longer count)."""
        lost: list[Hold] = []
        by_name: dict[str, list[Hold]] = {}
        for hold in holds:
            by_name.setdefault(hold.name, []).append(hold)
        for name, mine in by_name.items():
            while True:
                state = await self._read(name)
                until = self._clock() + hold_for
                gone = [hold for hold in mine if hold.holder not in state.holds]
                state.holds.update({hold.holder: until for hold in mine if hold not in gone})
                if await self._write(name, state):
                    lost += gone
                    break
        return lost

    async def release(self, hold: Hold) -> None:
        while True:
            state = await self._read(hold.name)
            if hold.holder not in state.holds:
                return
            del state.holds[hold.holder]
            if await self._write(hold.name, state):
                return

    async def held(self, name: str) -> int:
        """How many of name's slots are held now."""
        return len((await self._read(name)).holds)
