"""Token buckets every process of the cluster shares, in the NATS KV bucket `kurrier-limits`.

One bucket per (scope, key) holds `limit` tokens, refilled at `limit` per
`period`: a client's messages per minute, an identity's, a namespace's per
day. Any process of any replica spends from the same bucket, so the limit
holds for the cluster, however many pods run and whichever a client reaches.

The design, and why:

- **State.** A KV entry `<scope>.<sha256 of the key>` holds the bucket's
  level and the wall-clock time it was counted at. Every change is a
  compare-and-set on the entry's revision, decided at the stream's leader,
  so two processes never spend the same token. The key is hashed: keys are
  addresses and logins, which need neither be valid KV keys nor readable
  to whoever reads the bucket.
- **Nothing a dead pod leaves behind.** A process holds no lock and no slot
  in NATS: it only ever takes tokens out. Each write carries a per-message
  TTL of the time the bucket needs to refill completely, after which the
  entry says nothing a missing entry would not (a full bucket), and NATS
  removes it. The KV bucket is in memory: after a NATS restart every
  bucket starts full, as after a minute of silence.
- **A cheap hot path.** A process takes tokens in batches of up to
  `limit * HOLD / period` (one at low rates, never more than a quarter of
  what is left) and spends them locally; a batch it has not spent within
  HOLD seconds is dropped, never used later. It remembers the revision it
  wrote, so the next batch is one write (a read only after another process
  wrote). An empty bucket is remembered until its next token is due, so a
  client hammering past its limit is refused without asking NATS.
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
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import nats.errors
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
# JetStream's error code for a write whose expected last sequence did not match.
_WRONG_LAST_SEQUENCE = 10071


class CountersUnavailable(Exception):
    """NATS did not answer: nobody can say whether a token is left."""


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
    empty_until: float = 0.0
    stored: _Stored | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def entry_key(scope: str, key: str) -> str:
    """The KV key of one bucket: scope, then the key's hash (any text, one fixed length)."""
    return f"{scope}.{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"


class ClusterBuckets:
    """The shared token buckets of one scope (e.g. "client-messages")."""

    def __init__(
        self,
        js: JetStreamContext,
        kv: KeyValue,
        scope: str,
        replicas: int,
        *,
        clock: Callable[[], float] = time.time,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._js = js
        self._kv = kv
        self._scope = scope
        self._replicas = replicas
        self._clock = clock
        self._max_keys = max_keys
        self._keys: OrderedDict[str, _Local] = OrderedDict()

    @classmethod
    async def open(cls, js: JetStreamContext, scope: str, replicas: int) -> ClusterBuckets:
        """js: a context whose timeout is the one to give up after (TIMEOUT); replicas:
        the bucket's, should it have to be created again."""
        return cls(js, await js.key_value(LIMITS_BUCKET), scope, replicas)

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
                if now < local.empty_until:
                    return False
                await self._claim(key, local, rate, now)
            if not local.held:
                return False
            local.held -= 1
            return True

    def give_back(self, key: str) -> None:
        """Return a token take gave (its message was refused for another reason);
        it stays this process's, until its batch's HOLD ends."""
        local = self._keys.get(key)
        if local is not None and self._clock() < local.held_until:
            local.held += 1

    async def _claim(self, key: str, local: _Local, rate: Rate, now: float) -> None:
        """Move a batch from the shared bucket into local.held, or note when it is empty."""
        subject_key = entry_key(self._scope, key)
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.001 * attempt))
            stored = local.stored or await self._read(subject_key, rate, now)
            level = rate.refilled(stored.level, now - stored.at)
            if level < 1.0:
                local.stored = stored
                local.empty_until = now + rate.seconds_to(level, 1.0)
                return
            batch = rate.batch(level)
            left = level - batch
            try:
                revision = await self._write(subject_key, left, now, stored.revision, rate)
            except NoStreamResponseError:
                await self._create_bucket()
                local.stored = None
                continue
            except APIError as error:
                if error.err_code != _WRONG_LAST_SEQUENCE:
                    raise CountersUnavailable(repr(error)) from error
                local.stored = None  # another process wrote (or the entry expired): read again
                continue
            local.stored = _Stored(revision, left, now)
            local.held, local.held_until = batch, now + HOLD
            return
        raise CountersUnavailable(f"{ATTEMPTS} writes of {subject_key} lost to other processes")

    async def _read(self, subject_key: str, rate: Rate, now: float) -> _Stored:
        try:
            entry = await self._kv.get(subject_key)
        except NotFoundError:
            return _Stored(0, float(rate.limit), now)
        except (nats.errors.Error, TimeoutError) as error:
            raise CountersUnavailable(repr(error)) from error
        state = json.loads(entry.value or b"{}")
        return _Stored(entry.revision or 0, float(state["level"]), float(state["at"]))

    async def _write(
        self, subject_key: str, level: float, now: float, last: int, rate: Rate
    ) -> int:
        """Compare-and-set: the new level, if the entry is still at revision last."""
        value = json.dumps({"level": round(level, 6), "at": round(now, 6)}).encode()
        # Once full again the entry says nothing a missing one would not.
        ttl = max(1, math.ceil(rate.seconds_to(level, rate.limit)))
        try:
            ack = await self._js.publish(
                f"$KV.{LIMITS_BUCKET}.{subject_key}",
                value,
                headers={"Nats-Expected-Last-Subject-Sequence": str(last)},
                msg_ttl=ttl,
            )
        except (APIError, NoStreamResponseError):
            raise
        except (nats.errors.Error, TimeoutError) as error:
            raise CountersUnavailable(repr(error)) from error
        return ack.seq

    async def _create_bucket(self) -> None:
        try:
            await ensure_layout(self._js, self._replicas, streams={kv_stream(LIMITS_BUCKET)})
        except (nats.errors.Error, TimeoutError) as error:
            raise CountersUnavailable(repr(error)) from error
