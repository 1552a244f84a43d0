"""Tenant namespaces' quotas at RCPT: messages and recipients per minute and per day,
shared by every ingress replica (core/cluster_counters.py)."""

from __future__ import annotations

from kurrier.core.cluster_counters import TIMEOUT, ClusterBuckets, CountersUnavailable, Rate
from kurrier.core.routing import Quota
from kurrier.ingress.message_rates import RATES_UNAVAILABLE
from nats.aio.client import Client as NATS

MINUTE, DAY = 60.0, 86400.0


def quota_exceeded(tenant: str) -> str:
    return f"450 4.7.1 Mail quota of namespace {tenant} exceeded, try again later"


class TenantQuotas:
    def __init__(self, messages: ClusterBuckets, recipients: ClusterBuckets) -> None:
        self._messages = messages
        self._recipients = recipients

    @classmethod
    async def open(cls, nc: NATS, replicas: int) -> TenantQuotas:
        js = nc.jetstream(timeout=TIMEOUT)
        return cls(
            await ClusterBuckets.open(js, "namespace-messages", replicas),
            await ClusterBuckets.open(js, "namespace-recipients", replicas),
        )

    async def spend(self, quota: Quota, tenant: str, first_recipient: bool) -> str | None:
        """One recipient of tenant's quota, and one message with the transaction's first
        recipient; or the refusal (nothing spent)."""
        wanted = [
            (self._recipients, Rate(limit, period))
            for limit, period in (
                (quota.recipients_per_minute, MINUTE),
                (quota.recipients_per_day, DAY),
            )
            if limit
        ]
        if first_recipient:
            wanted += [
                (self._messages, Rate(limit, period))
                for limit, period in (
                    (quota.messages_per_minute, MINUTE),
                    (quota.messages_per_day, DAY),
                )
                if limit
            ]
        taken: list[tuple[ClusterBuckets, str]] = []  # given back unless all are taken
        try:
            for buckets, rate in wanted:
                key = f"{tenant} per {rate.period:.0f}s"
                if not await buckets.take(key, rate):
                    return quota_exceeded(tenant)
                taken.append((buckets, key))
            taken = []
        except CountersUnavailable:
            return RATES_UNAVAILABLE
        finally:
            for buckets, key in taken:
                buckets.give_back(key)
        return None
