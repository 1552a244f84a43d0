"""Whether DNS publishes the DKIM records a RelayDomain's status shows: its DkimPublished condition.

The operator asks its resolver for each record's TXT name and compares the
key (k= and p=) with the one the Secret holds; other tags (t=, n=, h=) are
the DNS administrator's to choose. Answers are cached for their TTL, and
the reconciler asks again every check interval, since a DNS change sends
the operator no event.
"""

from __future__ import annotations

import asyncio
import re
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.resolver
from kurrier.operator.status import DkimRecord, Verdict

DKIM_PUBLISHED = "DkimPublished"
# Short: the lookups hold up the status writes of a reconcile pass.
DKIM_LOOKUP_TIMEOUT = 5.0
K = TypeVar("K")
_TAG = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*([^;]*)")


def _key(value: str) -> tuple[str, str]:
    """(k, p) of a DKIM record (RFC 6376 3.6.1): k defaults to rsa, p without white space."""
    tags = {m.group(1).lower(): m.group(2) for m in map(_TAG.match, value.split(";")) if m}
    return tags.get("k", "rsa").strip().lower(), "".join(tags.get("p", "").split())


async def published_verdict(
    resolver: dns.asyncresolver.Resolver, records: list[DkimRecord]
) -> Verdict:
    """True when DNS publishes every record's key; else which are missing or differ."""
    missing: list[str] = []
    different: list[str] = []
    for record in records:
        try:
            answer = await resolver.resolve(record.name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            missing.append(record.name)
            continue
        except (dns.exception.DNSException, OSError) as error:
            return Verdict(False, "LookupFailed", f"TXT lookup of {record.name} failed: {error}")
        published = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        if _key(record.value) not in [_key(value) for value in published]:
            different.append(record.name)
    if missing:
        return Verdict(False, "RecordMissing", f"no DKIM record in DNS at {', '.join(missing)}")
    if different:
        names = ", ".join(different)
        return Verdict(False, "RecordMismatch", f"DNS publishes another key at {names}")
    return Verdict(True, "RecordsPublished", "DNS publishes every DKIM key")


class DkimDnsCheck:
    """The DkimPublished check: its resolver, and how often DNS is asked again."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, interval: float) -> None:
        self.resolver = resolver
        self.interval = interval

    async def verdicts(self, wanted: dict[K, list[DkimRecord]]) -> dict[K, Verdict]:
        """A verdict for each object's records, all looked up at once."""
        keys = list(wanted)
        found = await asyncio.gather(*(published_verdict(self.resolver, wanted[k]) for k in keys))
        return dict(zip(keys, found, strict=True))
