"""Limits every process of the cluster shares, in the NATS KV bucket `kurrier-limits`.

Two kinds, each an entry `<scope>.<sha256 of the key>` changed only by
compare-and-set on its revision (decided at the stream's leader), in a KV
bucket kept in memory (lost, it only starts empty again). The key is
hashed: keys are addresses and logins, which need neither be valid KV keys
nor readable to whoever reads the bucket.

## Token buckets (`ClusterBuckets`): rates

One bucket per (scope, key) holds `limit` tokens, refilled at `limit` per
`period`: a client's messages or failed AUTH per minute, an identity's
messages, a namespace's per day. Any process of any replica spends from
the same bucket, so the limit holds for the cluster, however many pods run
and whichever a client reaches.

The design, and why:

- **State.** The entry holds the bucket's level and the wall-clock time it
  was counted at; compare-and-set means two processes never spend the
  same token.
- **Nothing a dead pod leaves behind.** A process holds no lock and no slot
  in NATS: it only ever takes tokens out. Each write carries a per-message
  TTL of the time the bucket needs to refill completely, after which the
  entry says nothing a missing entry would not (a full bucket), and NATS
  removes it. After a NATS restart every bucket starts full, as after a
  minute of silence.
- **A cheap hot path.** A process takes tokens in batches of up to
  `limit * HOLD / period` (one at low rates, never more than a quarter of
  what is left) and spends them locally; a batch it has not spent within
  HOLD seconds is dropped, never used later. It remembers the revision it
  wrote, so the next batch is one write (a read only after another process
  wrote). An empty bucket is believed empty until its next token is due,
  so a client hammering past its limit is refused without asking NATS.
- **The tolerance.** Tokens are spent at most HOLD seconds after they left
  the shared bucket, so in any t seconds one key is let through at most
  `limit + limit * (t + HOLD) / period` times across the cluster: a single
  bucket's burst and refill, plus HOLD seconds of refill (for a per-minute
  rate with HOLD = 2 s, a thirtieth of the limit), plus the refill of the
  clock difference between pods (NTP keeps that to milliseconds). Batches
  dropped unspent count as spent: the error is on the refusing side.
- **NATS unreachable.** `take` raises CountersUnavailable (no answer within
  TIMEOUT, or no connection); the caller fails closed with a temporary
  reply. Only tokens already held locally are still spent. A single NATS
  server forgets memory streams when it restarts: the first write that
  finds no bucket creates it again.
- **Contention.** A write that lost to another process's reads and tries
  again, after a pause of up to a millisecond per loss so that the
  writers fall out of step; each loss is another process's progress.

## Leased counts (`ClusterLeases`): things held open

How many of something (a client's connections) all processes hold
together. The entry maps each process (host name and pid) to its count and
the time its share lapses; a process writes its own share only, always its
whole local count (never an increment), so a lost write is made good by the
next one.

- **Acquire** reads the entry, sums the other processes' shares that have
  not lapsed, and writes its own count plus one if the sum stays within
  the most allowed; release writes the count minus one.
- **Leases, not locks.** A share lapses LEASE seconds after it was last
  written, and `refresh` rewrites every share a process holds each
  LEASE / 3. A process that dies (or loses NATS) stops refreshing: LEASE
  seconds later the others no longer count what it held. Each write also
  gives the entry a TTL of LEASE, so an entry no live process refreshes
  disappears.
- **The tolerance.** While a process cannot reach NATS, its connections
  stay open but its share lapses, so the others may admit up to its count
  again; a release that could not be written counts until the next
  refresh writes the truth. Otherwise the count is exact.
- **NATS unreachable.** `acquire` raises CountersUnavailable; the caller
  fails closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from kurrier.core.background import Background
from kurrier.core.jetstream import LIMITS_BUCKET, ensure_layout, kv_stream
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue

# How long a process may hold tokens it took from the shared bucket.
HOLD = 2.0
# How long a read or a write may take before NATS counts as unreachable.
TIMEOUT = 2.0
# Compare-and-set attempts before giving up on a key other processes keep writing.
ATTEMPTS = 32
# Keys remembered per process (batches held, revisions, empty buckets); the
# longest idle is forgotten first, which costs only a read on its next use.
MAX_KEYS = 100_000
# A process's share of a leased count lapses this long after its last write.
LEASE = 15.0
# JetStream's error code for a write whose expected last sequence did not match.
_WRONG_LAST_SEQUENCE = 10071

log = logging.getLogger(__name__)


class CountersUnavailable(Exception):
    """NATS did not answer: nobody can say what is left."""


def entry_key(scope: str, key: str) -> str:
    """The KV key of one key's entry: scope, then the key's hash (any text, one fixed length)."""
    return f"{scope}.{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"


class _Entries:
    """One scope's entries: reads, compare-and-set writes, the bucket made again if gone."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, scope: str, replicas: int) -> None:
        self._js = js
        self._kv = kv
        self.scope = scope
        self._replicas = replicas

    @classmethod
    async def open(cls, js: JetStreamContext, scope: str, replicas: int) -> _Entries:
        return cls(js, await js.key_value(LIMITS_BUCKET), scope, replicas)

    async def read(self, subject_key: str) -> tuple[int, dict[str, Any]]:
        """(revision, value); (0, {}) when there is no entry."""
        try:
            entry = await self._kv.get(subject_key)
        except NotFoundError:
            return 0, {}
        except (nats.errors.Error, TimeoutError) as error:
            raise CountersUnavailable(repr(error)) from error
        return entry.revision or 0, json.loads(entry.value or b"{}")

    async def write(
        self, subject_key: str, value: dict[str, Any], last: int, ttl: float
    ) -> int | None:
        """The new revision, or None when the entry is no longer at revision last (another
        process wrote, the entry expired, the bucket had to be made again): read again."""
        try:
            ack = await self._js.publish(
                f"$KV.{LIMITS_BUCKET}.{subject_key}",
                json.dumps(value, separators=(",", ":")).encode(),
                headers={"Nats-Expected-Last-Subject-Sequence": str(last)},
                msg_ttl=max(1, math.ceil(ttl)),
            )
        except NoStreamResponseError:
            # A single NATS server forgets memory streams when it restarts.
            await self._create_bucket()
            return None
        except APIError as error:
            if error.err_code == _WRONG_LAST_SEQUENCE:
                return None
            raise CountersUnavailable(repr(error)) from error
        except (nats.errors.Error, TimeoutError) as error:
            raise CountersUnavailable(repr(error)) from error
        return ack.seq

    async def _create_bucket(self) -> None:
        try:
            await ensure_layout(self._js, self._replicas, streams={kv_stream(LIMITS_BUCKET)})
        except (nats.errors.Error, TimeoutError) as error:
            raise CountersUnavailable(repr(error)) from error


# A generator of its own: draws from the global one would disturb whoever seeds
# it to make a run reproducible (Hypothesis, in the fuzz tests).
_JITTER = random.Random()


async def _pause_after_lost_write(attempt: int) -> None:
    """Writers that lost fall out of step rather than collide again."""
    if attempt:
        await asyncio.sleep(_JITTER.uniform(0, 0.001 * attempt))


@dataclass(frozen=True)
class Rate:
    """limit tokens, refilled at limit per period seconds."""

    limit: int
    period: float = 60.0

    def refilled(self, level: float, seconds: float) -> float:
        return min(float(self.limit), level + max(seconds, 0.0) * self.limit / self.period)

    def seconds_to(self, level: float, target: float) -> float:
        """How long the bucket takes from level to target."""
        return max(target - level, 0.0) * self.period / self.limit

    def batch(self, level: float) -> int:
        """How many tokens one take moves from the shared bucket to a process."""
        per_hold = math.floor(self.limit * HOLD / self.period)
        return max(1, min(per_hold, math.floor(level / 4)))


@dataclass
class _Stored:
    """The shared bucket as this process last wrote or read it."""

    revision: int  # 0: no entry
    level: float
    at: float


@dataclass
class _Local:
    """One key's state in this process."""

    held: int = 0
    held_until: float = 0.0
    stored: _Stored | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ClusterBuckets:
    """The shared token buckets of one scope (e.g. "client-messages")."""

    def __init__(
        self,
        entries: _Entries,
        *,
        clock: Callable[[], float] = time.time,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._entries = entries
        self._clock = clock
        self._max_keys = max_keys
        self._keys: OrderedDict[str, _Local] = OrderedDict()

    @classmethod
    async def open(cls, js: JetStreamContext, scope: str, replicas: int) -> ClusterBuckets:
        """js: a context whose timeout is the one to give up after (TIMEOUT); replicas:
        the bucket's, should it have to be made again."""
        return cls(await _Entries.open(js, scope, replicas))

    def _local(self, key: str) -> _Local:
        local = self._keys.get(key)
        if local is None:
            local = self._keys[key] = _Local()
            while len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
        self._keys.move_to_end(key)
        return local

    async def take(self, key: str, rate: Rate) -> bool:
        """Spend one token of key's bucket; False when the bucket is empty.

        Raises CountersUnavailable when it takes NATS to know and NATS does not answer."""
        local = self._local(key)
        async with local.lock:
            now = self._clock()
            if local.held and now >= local.held_until:
                local.held = 0  # unspent within HOLD: never spent (the tolerance's bound)
            if not local.held:
                await self._claim(entry_key(self._entries.scope, key), local, rate, now)
            if not local.held:
                return False
            local.held -= 1
            return True

    async def available(self, key: str, rate: Rate) -> bool:
        """Whether key's bucket has a token, without spending one.

        An empty bucket as last seen is believed until its next token is due
        (as take believes it); otherwise the entry is read. Raises
        CountersUnavailable when NATS does not answer."""
        local = self._local(key)
        async with local.lock:
            now = self._clock()
            if local.held and now < local.held_until:
                return True
            stored = local.stored
            if stored is None or rate.refilled(stored.level, now - stored.at) >= 1.0:
                stored = await self._read(entry_key(self._entries.scope, key), rate, now)
                local.stored = stored
            return rate.refilled(stored.level, now - stored.at) >= 1.0

    def give_back(self, key: str) -> None:
        """Return a token take gave (its message was refused for another reason);
        it stays this process's, until its batch's HOLD ends."""
        local = self._keys.get(key)
        if local is not None and self._clock() < local.held_until:
            local.held += 1

    async def _claim(self, subject_key: str, local: _Local, rate: Rate, now: float) -> None:
        """Move a batch from the shared bucket into local.held, if it has any.

        The bucket as last seen is believed until a write says otherwise: others
        only take tokens out, so an empty one stays empty until its refill."""
        for attempt in range(ATTEMPTS):
            await _pause_after_lost_write(attempt)
            stored = local.stored or await self._read(subject_key, rate, now)
            level = rate.refilled(stored.level, now - stored.at)
            if level < 1.0:
                local.stored = stored
                return
            batch = rate.batch(level)
            left = level - batch
            value = {"level": round(left, 6), "at": round(now, 6)}
            # Once full again the entry says nothing a missing one would not.
            ttl = rate.seconds_to(left, rate.limit)
            revision = await self._entries.write(subject_key, value, stored.revision, ttl)
            if revision is None:
                local.stored = None
                continue
            local.stored = _Stored(revision, left, now)
            local.held, local.held_until = batch, now + HOLD
            return
        raise CountersUnavailable(f"{ATTEMPTS} writes of {subject_key} lost to other processes")

    async def _read(self, subject_key: str, rate: Rate, now: float) -> _Stored:
        revision, state = await self._entries.read(subject_key)
        if not revision:
            return _Stored(0, float(rate.limit), now)
        return _Stored(revision, float(state["level"]), float(state["at"]))


def process_name() -> str:
    """This process among all of the cluster's: its host (the pod) and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ClusterLeases:
    """Leased counts of one scope (e.g. "client-connections"): what all processes hold."""

    def __init__(
        self,
        entries: _Entries,
        *,
        holder: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._entries = entries
        self._holder = holder or process_name()
        self._clock = clock
        self._held: Counter[str] = Counter()
        # Keys whose stored share may differ from _held (a write failed).
        self._unwritten: set[str] = set()
        self._writes = Background()

    @classmethod
    async def open(cls, js: JetStreamContext, scope: str, replicas: int) -> ClusterLeases:
        """As ClusterBuckets.open."""
        return cls(await _Entries.open(js, scope, replicas))

    async def acquire(self, key: str, most: int) -> bool:
        """One more of key, if all processes together then hold at most `most`.

        Raises CountersUnavailable when NATS does not answer."""
        # Counted before it is written: a concurrent write of this key by this
        # process then includes it (counting one too many is the safe side).
        self._held[key] += 1
        try:
            admitted = await self._write_share(key, most)
        except BaseException:  # NATS away, or the caller gone: the write may have landed
            admitted = False
            raise
        finally:
            if not admitted:
                self._drop(key)
                self._unwritten.add(key)  # a share with this one may be stored
        return admitted

    def release(self, key: str) -> None:
        """One fewer of key; written in the background (refresh retries a failed write)."""
        self._drop(key)
        self._writes.start(self._write_truth(key))

    async def flush(self) -> None:
        """Until the releases in flight are written (or failed): before disconnecting."""
        await self._writes.finished()

    async def refresh(self) -> None:
        """Forever: every LEASE / 3, rewrite each share this process holds or owes."""
        while True:
            await asyncio.sleep(LEASE / 3)
            for key in {*self._held, *self._unwritten}:
                await self._write_truth(key)

    def _drop(self, key: str) -> None:
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]

    async def _write_truth(self, key: str) -> None:
        try:
            await self._write_share(key, None)
        except CountersUnavailable as error:
            self._unwritten.add(key)
            log.warning("shared count %s not written: %s", self._entries.scope, error)

    async def _write_share(self, key: str, most: int | None) -> bool:
        """Store this process's count of key as its share; with most, only if all shares
        together stay within it (False: they would not)."""
        subject_key = entry_key(self._entries.scope, key)
        for attempt in range(ATTEMPTS):
            await _pause_after_lost_write(attempt)
            now = self._clock()
            revision, state = await self._entries.read(subject_key)
            shares = {
                holder: share
                for holder, share in state.get("shares", {}).items()
                if share["until"] > now and holder != self._holder
            }
            # Read after the entry: the newest count wins whichever write lands last.
            count = self._held[key]
            if most is not None and sum(s["count"] for s in shares.values()) + count > most:
                return False
            if count:
                shares[self._holder] = {"count": count, "until": round(now + LEASE, 3)}
            written = await self._entries.write(subject_key, {"shares": shares}, revision, LEASE)
            if written is not None:
                self._unwritten.discard(key)
                return True
        raise CountersUnavailable(f"{ATTEMPTS} writes of {subject_key} lost to other processes")
