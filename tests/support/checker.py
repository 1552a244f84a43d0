"""The verdict after a nemesis run: every acknowledged message delivered or bounced.

Compares what the SMTP clients were told (the loads' Ledgers, one per ingress,
taken together: a message may arrive through any queue and delivery) with
what reached the next hop (the sink): a message to the recipient is a delivery, a DSN to
the load's sender naming the message (its Subject is among the returned
headers) is a bounce.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from tests.support.load import Ledger
from tests.support.sink import Received


def subject(content: bytes) -> str | None:
    head = content.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line.startswith(b"Subject: "):
            return line.removeprefix(b"Subject: ").decode(errors="replace")
    return None


def combined(ledgers: Iterable[Ledger]) -> Ledger:
    """The ledgers of loads side by side as one (their markers differ by load)."""
    together = Ledger()
    for ledger in ledgers:
        together.acknowledged |= ledger.acknowledged
        together.refused |= ledger.refused
        together.refused_for_good |= ledger.refused_for_good
        together.in_doubt |= ledger.in_doubt
        together.replies += ledger.replies
    return together


@dataclass(frozen=True)
class Outcome:
    """What reached the next hop, by marker."""

    deliveries: Counter[str]
    bounced: frozenset[str]

    @property
    def delivered(self) -> frozenset[str]:
        return frozenset(self.deliveries)


def outcome(received: list[Received], recipient: str, sender: str, markers: set[str]) -> Outcome:
    deliveries: Counter[str] = Counter()
    bounced: set[str] = set()
    for message in received:
        if recipient in message.recipients:
            marker = subject(message.content)
            if marker is not None:
                deliveries[marker] += 1
        elif sender in message.recipients:
            bounced |= {m for m in markers if f"Subject: {m}\r\n".encode() in message.content}
    return Outcome(deliveries, frozenset(bounced))


@dataclass(frozen=True)
class Report:
    acknowledged: int
    delivered: int
    bounced: int
    lost: tuple[str, ...]
    duplicated: int  # messages delivered more than once
    extra_copies: int  # deliveries beyond the first
    in_doubt_delivered: int  # delivered though the client saw a failure
    phantoms: tuple[str, ...]  # delivered though never sent

    def lines(self) -> list[str]:
        return [
            f"acknowledged {self.acknowledged}",
            f"delivered {self.delivered} (in doubt to the client: {self.in_doubt_delivered})",
            f"bounced {self.bounced}",
            f"lost {len(self.lost)} {list(self.lost[:10])}",
            f"duplicated {self.duplicated} ({self.extra_copies} extra copies)",
            f"phantoms {len(self.phantoms)} {list(self.phantoms[:10])}",
        ]


def check(ledger: Ledger, result: Outcome) -> Report:
    acknowledged = set(ledger.acknowledged)
    arrived = result.delivered | result.bounced
    duplicates = {marker: n for marker, n in result.deliveries.items() if n > 1}
    return Report(
        acknowledged=len(acknowledged),
        delivered=len(result.delivered),
        bounced=len(result.bounced),
        lost=tuple(sorted(acknowledged - arrived)),
        duplicated=len(duplicates),
        extra_copies=sum(n - 1 for n in duplicates.values()),
        in_doubt_delivered=len(result.delivered & (ledger.in_doubt | ledger.refused)),
        phantoms=tuple(sorted(result.delivered - ledger.attempted)),
    )
