"""TLS reporting (RFC 8460): the sessions delivery opens to MX hosts, counted per UTC day
and per recipient domain's policy, and a day's aggregate report as the RFC's JSON.

Every session opened to an MX host of a route that uses TLS counts once: a
success when TLS was established (verified, where the hop's mode asks for
it), else a failure of the RFC's result type (`starttls-not-supported`,
`certificate-not-trusted`, ...). Sessions reused from the pool are not new
sessions; smarthosts are the operator's, not a policy domain's, and are not
counted. Each delivery process counts its own sessions in memory and keeps
the last KEEP_DAYS days: a report covers the sessions of one process (RFC
8460 lets a sender's MTAs report separately, each with its own report-id),
and a restart starts the day's counts again. Sending reports to the `rua`
of a domain's `_smtp._tls` record is not done here; the report is served
for that on the delivery process's metrics listener, at `/tlsrpt`.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from kurrier.core.metrics import TLS_SESSIONS
from kurrier.delivery.mta_sts import StsPolicy
from kurrier.delivery.next_hop import NextHop

KEEP_DAYS = 3


@dataclass(frozen=True)
class _Policy:
    domain: str
    type: str  # "tlsa", "sts" or "no-policy-found"
    strings: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()


@dataclass
class _Counts:
    successful: int = 0
    # (result type, receiving MX host name, receiving IP) -> sessions
    failures: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)


def _policy_of(hop: NextHop) -> _Policy:
    if hop.tlsa is not None:
        return _Policy(hop.policy_domain, "tlsa", tuple(str(r) for r in hop.tlsa.records))
    policy: StsPolicy | None = hop.policy
    if policy is None or policy.mode == "none":
        return _Policy(hop.policy_domain, "no-policy-found")
    strings = (
        "version: STSv1",
        f"mode: {policy.mode}",
        *(f"mx: {pattern}" for pattern in policy.mx),
        f"max_age: {policy.max_age}",
    )
    return _Policy(hop.policy_domain, "sts", strings, policy.mx)


def _day(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).date().isoformat()


class TlsReports:
    def __init__(self, organization: str, clock: Callable[[], float] = time.time) -> None:
        self._organization = organization
        self._clock = clock
        self._days: dict[str, dict[_Policy, _Counts]] = {}

    def record(self, hop: NextHop, failure: str | None) -> None:
        """One session opened to hop: failure is the RFC 8460 result type, None for success."""
        if not hop.policy_domain:
            return
        policy = _policy_of(hop)
        day = _day(self._clock())
        if day not in self._days:
            self._days[day] = {}
            for old in sorted(self._days)[:-KEEP_DAYS]:
                del self._days[old]
        counts = self._days[day].setdefault(policy, _Counts())
        if failure is None:
            counts.successful += 1
        else:
            counts.failures[(failure, hop.server_name, hop.address)] += 1
        # Not by domain: MX routes reach any number of them (the report has each).
        TLS_SESSIONS.add(1, {"policy_type": policy.type, "result": failure or "success"})

    def report(self, day: str) -> dict[str, Any]:
        """The aggregate report (RFC 8460 4.4) of this process's sessions on day (UTC)."""
        return {
            "organization-name": self._organization,
            "date-range": {
                "start-datetime": f"{day}T00:00:00Z",
                "end-datetime": f"{day}T23:59:59Z",
            },
            "contact-info": f"postmaster@{self._organization}",
            "report-id": f"{day}_{self._organization}_{os.getpid()}",
            "policies": [
                {
                    "policy": {
                        "policy-type": policy.type,
                        **({"policy-string": list(policy.strings)} if policy.strings else {}),
                        "policy-domain": policy.domain,
                        **({"mx-host": list(policy.mx)} if policy.mx else {}),
                    },
                    "summary": {
                        "total-successful-session-count": counts.successful,
                        "total-failure-session-count": sum(counts.failures.values()),
                    },
                    "failure-details": [
                        {
                            "result-type": result_type,
                            "receiving-mx-hostname": host,
                            "receiving-ip": address,
                            "failed-session-count": sessions,
                        }
                        for (result_type, host, address), sessions in sorted(
                            counts.failures.items()
                        )
                    ],
                }
                for policy, counts in sorted(
                    self._days.get(day, {}).items(), key=lambda item: item[0].domain
                )
            ],
        }

    def report_document(self, query: str) -> bytes:
        """GET /tlsrpt?day=YYYY-MM-DD (default: today, UTC): the report as JSON."""
        day = parse_qs(query).get("day", [_day(self._clock())])[0]
        try:
            datetime.date.fromisoformat(day)
        except ValueError:
            raise ValueError(f"day {day!r} is not YYYY-MM-DD") from None
        return json.dumps(self.report(day), indent=2).encode() + b"\n"
