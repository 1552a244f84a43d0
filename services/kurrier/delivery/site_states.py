"""What the traffic shaping of each destination site is doing now, read from its keys.

`kurrier queue sites` shows it: every site with keys in kurrier-shaping
(used within the bucket's TTL), read as delivery writes them
(delivery/site_shaping.py), limits computed as delivery computes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kurrier.core.cluster_slots import ClusterSlots
from kurrier.delivery.site_shaping import (
    Limits,
    connections_key,
    description_key,
    in_force,
    messages_key,
    read_pace,
)
from kurrier.delivery.sites import Site
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue


@dataclass(frozen=True)
class SiteState:
    name: str
    configured: Limits
    # Lowered from configured while the site is slowed down.
    allowed: Limits
    # Connections open to the site now, across every delivery process.
    connections: int
    # Transactions started in the last minute (counted when the site has a rate).
    messages_last_minute: int
    # Unix time since which the site is slowed down; None when it is not.
    slowed_since: float | None


async def _site(kv: KeyValue, site_key: str) -> tuple[Site, int | None]:
    """The site and its route's maxConnections, as delivery last described them."""
    try:
        entry = await kv.get(description_key(site_key))
    except KeyNotFoundError:
        # Slots whose description has expired or is not written yet: known by key only.
        return Site(site_key, None, None), None
    fields = json.loads(entry.value or b"{}")
    site = Site(fields["name"], fields.get("max_connections"), fields.get("per_minute"))
    return site, fields.get("route_connections")


async def site_states(kv: KeyValue) -> list[SiteState]:
    """Every site with shaping state, by name."""
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    slots = ClusterSlots(kv)
    states = []
    for site_key in sorted({key.split(".", 1)[0] for key in keys}):
        site, route_connections = await _site(kv, site_key)
        pace = await read_pace(kv, site_key)
        states.append(
            SiteState(
                name=site.name,
                configured=Limits(site.max_connections, site.per_minute),
                allowed=in_force(site, route_connections, pace),
                connections=await slots.held(connections_key(site_key)),
                messages_last_minute=await slots.held(messages_key(site_key)),
                slowed_since=None if pace is None else pace.since,
            )
        )
    return sorted(states, key=lambda state: state.name)
