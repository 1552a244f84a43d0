"""What the operator writes into a resource's `status`, decided by pure functions.

The models here are also the source of the CRDs' status schema (crds.py), so
what the operator writes and what the API server accepts cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from kurrier.core.routing import Problem
from pydantic import BaseModel, ConfigDict, Field, ValidationError

READY = "Ready"
# Ready=True carries one reason; Ready=False carries the Problem's reason
# (Invalid, SecretInvalid, Conflict, NoRoute).
PUBLISHED = "Published"
LIVE_MESSAGE = "in the live routing table"


class Condition(BaseModel):
    """A metav1.Condition, the Kubernetes convention for status conditions."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: str = Field(min_length=1, max_length=316)
    status: Literal["True", "False", "Unknown"]
    observedGeneration: int | None = Field(default=None, ge=0)
    lastTransitionTime: datetime
    reason: str = Field(
        min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    message: str = Field(max_length=32768)


class RelayStatus(BaseModel):
    """The status of a RelayDomain or RelayPolicy."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    observedGeneration: int | None = Field(default=None, ge=0)
    tableRevision: int | None = Field(default=None, ge=0)
    conditions: list[Condition] = Field(default_factory=list)

    def condition(self, kind: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)


class RouteStatus(RelayStatus):
    """The status of a RelayRoute: also where it sends mail, for `kubectl get`."""

    destination: str | None = None


class DkimRecord(BaseModel):
    """The DNS TXT record that publishes one DKIM key."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    selector: str
    name: str
    value: str


class DomainStatus(RelayStatus):
    """The status of a RelayDomain: also the DNS records its DKIM keys need."""

    dkimRecords: list[DkimRecord] = Field(default_factory=list)


STATUS_MODELS: dict[str, type[RelayStatus]] = {
    "RelayDomain": DomainStatus,
    "RelayRoute": RouteStatus,
    "RelayPolicy": RelayStatus,
}


@dataclass(frozen=True)
class Verdict:
    """Whether one resource is usable, and why not."""

    ready: bool
    reason: str
    message: str


@dataclass(frozen=True)
class EventNote:
    """A Kubernetes Event to record alongside a status change."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class StatusChange:
    status: RelayStatus
    events: tuple[EventNote, ...]  # Ready's when it changed, then each other condition's


def verdict(problems: Iterable[Problem]) -> Verdict:
    """Ready unless the compiler reported problems for this resource; all of them are shown."""
    problems = list(problems)
    if not problems:
        return Verdict(True, PUBLISHED, LIVE_MESSAGE)
    return Verdict(False, problems[0].reason, "; ".join(p.message for p in problems))


def read_status(raw: object, model: type[RelayStatus]) -> RelayStatus | None:
    """The status as stored in the object; None when absent or written by something else."""
    if not isinstance(raw, dict) or not raw:
        return None
    try:
        return model.model_validate(raw)
    except ValidationError:
        return None


def _same(condition: Condition | None, judged: Verdict) -> bool:
    return (
        condition is not None
        and (condition.status == "True") == judged.ready
        and (condition.reason, condition.message) == (judged.reason, judged.message)
    )


def _condition(
    kind: str, judged: Verdict, before: Condition | None, generation: int, now: datetime
) -> Condition:
    status_text: Literal["True", "False"] = "True" if judged.ready else "False"
    since = (
        now.replace(microsecond=0)
        if before is None or before.status != status_text
        else before.lastTransitionTime
    )
    return Condition(
        type=kind,
        status=status_text,
        observedGeneration=generation,
        lastTransitionTime=since,
        reason=judged.reason,
        message=judged.message,
    )


def next_status(
    current: RelayStatus | None,
    generation: int,
    judged: Verdict,
    revision: int,
    now: datetime,
    model: type[RelayStatus] = RelayStatus,
    details: Mapping[str, object] | None = None,
    conditions: Mapping[str, Verdict] | None = None,
) -> StatusChange | None:
    """The status to write, or None when the current one already says it all.

    details are the fields of the kind's own status (a route's destination,
    a domain's DKIM records), conditions its conditions besides Ready (a
    domain's DkimPublished), compared and written with the rest. The table
    revision is recorded when this generation (or its Ready verdict) is
    first published, not on every revision: a change to one resource must
    not rewrite the status of all the others.
    """
    details = details or {}
    judged_all = {READY: judged, **(conditions or {})}
    same_ready = (
        current is not None
        and current.observedGeneration == generation
        and current.tableRevision is not None
        and _same(current.condition(READY), judged)
        and current.model_dump(mode="json", include=set(details))
        == model.model_validate(details).model_dump(mode="json", include=set(details))
    )
    changed = [
        verdict
        for kind, verdict in judged_all.items()
        if kind != READY and not _same(current.condition(kind) if current else None, verdict)
    ]
    if same_ready and not changed and current and len(current.conditions) == len(judged_all):
        return None
    fields: dict[str, object] = {
        "observedGeneration": generation,
        # Only another condition moved (DNS changed): the table revision stays.
        "tableRevision": current.tableRevision if same_ready and current else revision,
        "conditions": [
            _condition(kind, v, current.condition(kind) if current else None, generation, now)
            for kind, v in judged_all.items()
        ],
        **details,
    }
    events = []
    if not same_ready:
        published = f"generation {generation} is in routing table revision {revision}"
        events.append(
            EventNote("Normal", PUBLISHED, published)
            if judged.ready
            else EventNote("Warning", judged.reason, judged.message)
        )
    events += [
        EventNote("Normal" if note.ready else "Warning", note.reason, note.message)
        for note in changed
    ]
    return StatusChange(model.model_validate(fields), tuple(events))
