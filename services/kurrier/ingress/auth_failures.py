"""Failed AUTH per client, counted for the whole cluster.

Each failure takes a token of the client's bucket in `kurrier-limits`
(core/cluster_counters.py), refilled at the per-minute rate; with the bucket
empty the client is locked out whichever replica it reaches, so N replicas
do not give a password guesser N times the tries.
"""

from __future__ import annotations

import contextlib

from kurrier.core.cluster_counters import TIMEOUT, ClusterBuckets, CountersUnavailable, Rate
from nats.aio.client import Client as NATS

SCOPE = "auth-failures"


class AuthFailures:
    def __init__(self, buckets: ClusterBuckets, per_minute: int) -> None:
        self._buckets = buckets
        self._rate = Rate(per_minute)

    @classmethod
    async def open(cls, nc: NATS, replicas: int, per_minute: int) -> AuthFailures:
        """replicas: of the limits' KV bucket (--nats-replicas)."""
        return cls(
            await ClusterBuckets.open(nc.jetstream(timeout=TIMEOUT), SCOPE, replicas), per_minute
        )

    async def locked_out(self, client: str) -> bool:
        """Whether client has used up its failures; raises CountersUnavailable when
        NATS does not answer (nobody can say: the caller refuses for now)."""
        return not await self._buckets.available(client, self._rate)

    async def count(self, client: str) -> None:
        """Spend one of client's failures. Without NATS it goes uncounted, but the
        next AUTH is refused for as long as NATS does not answer."""
        with contextlib.suppress(CountersUnavailable):
            await self._buckets.take(client, self._rate)
