"""The message rates at MAIL: per client and per identity, shared by every ingress replica."""

from __future__ import annotations

from kurrier.core.cluster_counters import TIMEOUT, ClusterBuckets, CountersUnavailable, Rate
from kurrier.core.routing import CompiledPolicy
from nats.aio.client import Client as NATS

CLIENT_RATE = "450 4.7.1 Message rate limit exceeded for your address, try again later"
IDENTITY_RATE = "450 4.7.1 Message rate limit exceeded for this login, try again later"
# Failing closed: without NATS nobody knows what a limited client has left.
RATES_UNAVAILABLE = "451 4.3.0 Message rate limits cannot be checked now, try again later"


class MessageRates:
    def __init__(self, clients: ClusterBuckets, identities: ClusterBuckets) -> None:
        self._clients = clients
        self._identities = identities

    @classmethod
    async def open(cls, nc: NATS, replicas: int) -> MessageRates:
        """replicas: of the limits' KV bucket (--nats-replicas)."""
        js = nc.jetstream(timeout=TIMEOUT)
        return cls(
            await ClusterBuckets.open(js, "client-messages", replicas),
            await ClusterBuckets.open(js, "identity-messages", replicas),
        )

    async def spend(self, policy: CompiledPolicy, client: str | None, identity: str) -> str | None:
        """One message from each of the client's and the login's buckets, or the refusal.

        client None: a client the per-client limits do not apply to; identity
        "": none (no AUTH)."""
        client_rate, identity_rate = policy.rate_per_minute, policy.identity_rate_per_minute
        spent: str | None = None  # the client's token, given back if the login is refused
        try:
            if client is not None and client_rate:
                if not await self._clients.take(client, Rate(client_rate)):
                    return CLIENT_RATE
                spent = client
            if (
                identity
                and identity_rate
                and not await self._identities.take(identity, Rate(identity_rate))
            ):
                return IDENTITY_RATE
            spent = None
        except CountersUnavailable:
            return RATES_UNAVAILABLE
        finally:
            if spent is not None:
                self._clients.give_back(spent)
        return None
