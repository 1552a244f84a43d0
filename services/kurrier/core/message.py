"""The queue's records of a message, and the jobs and results that move between services."""

from __future__ import annotations

import os
import time
from typing import Any, Literal, Self

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_serializer, model_validator

RecipientStatus = Literal["queued", "deferred", "delivered", "bounced", "expired"]
FAILED_STATUSES: frozenset[str] = frozenset({"bounced", "expired"})
FINAL_STATUSES: frozenset[str] = FAILED_STATUSES | {"delivered"}
# Where a message's body is: in its record (core/body_store.py, place_body),
# else one message of the bodies stream or, when larger than INLINE_BODY_LIMIT
# (core/jetstream.py), the object store.
BodyStore = Literal["record", "stream", "object"]

# A body this small is part of its record's JSON (base64) and carried by each
# job, so delivery reads nothing to send it. A larger body in the record is
# attached to its JSON, as it is (MessageRecord.document), and delivery reads
# the record for it: base64 of 100 KB in both record and job, both ways,
# costs more than the write it saves (bench/results/2026-12-07-syncs-and-go-processors.md).
CARRIED_BODY_LIMIT = 4 * 1024
# What separates a record's JSON from the body attached to it: JSON never holds
# a raw NUL octet (it escapes every control character in a string).
_ATTACHMENT = b"\0"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def new_queue_id() -> str:
    """A 20-character id that sorts by arrival time, like Postfix's long queue ids."""
    return f"{time.time_ns() // 1_000_000:012X}{os.urandom(4).hex().upper()}"


# Enough attempts to see a pattern in `kurrier queue show`, bounded so a
# message retried for days does not grow its record without limit.
HISTORY_LIMIT = 10


class Attempt(_Model):
    at: float
    reply: str


class RecipientState(_Model):
    address: str
    status: RecipientStatus = "queued"
    attempts: int = 0
    last_reply: str = ""
    next_attempt: float = 0.0
    history: list[Attempt] = []
    # The client's NOTIFY and ORCPT (core/dsn_parameters.py; "" when not given).
    notify: str = ""
    orcpt: str = ""
    # Delivered to a next hop that does not offer DSN, so no later hop tells the
    # sender of it: the queue sends a "relayed" notice if NOTIFY asked for SUCCESS.
    relayed: bool = False

    def record_attempt(self, at: float, reply: str) -> None:
        self.last_reply = reply
        self.history = [*self.history[-(HISTORY_LIMIT - 1) :], Attempt(at=at, reply=reply)]


class MessageRecord(_Model):
    """Everything the queue knows about one accepted message, kept in NATS KV."""

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    queue_id: str
    mail_from: str
    recipients: list[RecipientState]
    received_at: float
    size: int
    body_store: BodyStore
    client_address: str = ""
    client_helo: str = ""
    authenticated_as: str = ""
    # The client was in trustedNetworks when it sent the message. Authenticated
    # or trusted, its sender is believed; otherwise bounces follow the policy's
    # bounceUnauthenticated (queue/notice_policy.py).
    client_trusted: bool = False
    # The namespace whose resources govern the message (core/tenancy.py).
    tenant: str = ""
    smtputf8: bool = False
    body_type: str = ""
    message_id_header: str = ""
    # The client's RET and ENVID (core/dsn_parameters.py; "" when not given).
    dsn_ret: str = ""
    dsn_envid: str = ""
    # The client gave REQUIRETLS (RFC 8689): every hop must be verified TLS that
    # offers REQUIRETLS, or the message bounces (delivery/require_tls.py).
    require_tls: bool = False
    # How many times jobs were published for this message; part of each job's
    # dedup id so a re-dispatch is never mistaken for a duplicate.
    dispatches: int = 0
    held: bool = False
    # Whether a retry schedule may exist in JetStream for this message, so
    # that mail never deferred costs no cancellation when it leaves.
    scheduled: bool = False
    # Delivery status notifications sent for this message so far; part of each
    # notification's queue id, so re-applying a result cannot bounce twice.
    notices: int = 0
    # Whether the sender was warned that the message is delayed (once per message).
    delay_warned: bool = False
    # W3C traceparent of the message's trace, so retries and bounces join it.
    traceparent: str = ""
    # The body itself when body_store is "record".
    body: bytes | None = None

    def document(self) -> bytes:
        """The record as stored: its JSON and, when it holds a body larger than
        CARRIED_BODY_LIMIT, a NUL and that body as it is. Fields at their
        defaults are left out, so a field added later is written only when a
        message uses it: a record that does not stays readable by queue pods of
        the version before, whose strict model refuses fields it does not know
        (and, as such a field, a body attached)."""
        if not self.body_attached:
            return self.model_dump_json(exclude_defaults=True).encode()
        head = self.model_dump_json(exclude_defaults=True, exclude={"body"}).encode()
        return b"".join((head, _ATTACHMENT, self.body or b""))

    @classmethod
    def from_document(cls, document: bytes) -> MessageRecord:
        """The record that document() stored."""
        end = document.find(_ATTACHMENT)
        if end < 0:
            return cls.model_validate_json(document)
        record = cls.model_validate_json(document[:end])
        record.body = document[end + 1 :]
        return record

    @property
    def body_attached(self) -> bool:
        """Whether the record holds its body outside its JSON (document)."""
        return self.body is not None and len(self.body) > CARRIED_BODY_LIMIT

    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.status not in FINAL_STATUSES]

    @property
    def state(self) -> str:
        """As postqueue shows it: held, active (a job is out) or deferred (waiting)."""
        if self.held:
            return "held"
        if any(r.status == "queued" for r in self.pending()):
            return "active"
        return "deferred"


# The format of jobs and results. Within a version, fields are only ever
# added, as optional ones that an older pod ignores, and a field's name on the
# wire never changes (an alias keeps it when the code's name does). A change
# that an older pod would get wrong, rather than ignore, raises the version.
# Version 2 carries the DSN parameters (RFC 3461) in jobs and "relayed" in
# results: a version 1 pod would drop them unseen (a next hop never told of
# NOTIFY=NEVER, a "relayed" notice never sent). Version 3 jobs carry their
# body: a version 2 pod would look for it in the bodies stream, find nothing
# and drop the job as a deleted message's. Version 4 jobs may ask for
# REQUIRETLS: a version 3 pod would send them over any TLS or none. Version 5
# jobs carry their tenant: a version 4 pod would route them by every
# namespace's routes. Version 6 jobs may leave their body in the record
# (body_store "record" without a body): a version 5 pod would send it empty.
WIRE_VERSION = 6
DSN_WIRE_VERSION = 2
BODY_WIRE_VERSION = 3
REQUIRE_TLS_WIRE_VERSION = 4
TENANT_WIRE_VERSION = 5
BODY_IN_RECORD_WIRE_VERSION = 6


class _Tolerant(BaseModel):
    """Part of a message between services: fields it does not know are ignored."""

    model_config = ConfigDict(extra="ignore", serialize_by_alias=True)


class WireMessage(_Tolerant):
    """A message between services through JetStream, such as a newer queue's job
    reaching an older delivery pod during a rolling upgrade."""

    version: int = WIRE_VERSION

    @property
    def understood(self) -> bool:
        """False for a message in a newer format: leave it to a pod that reads it."""
        return self.version <= WIRE_VERSION

    def in_oldest_format(self) -> Self:
        """This message marked with the oldest version that says all it says, so that
        pods of that version still take it while an upgrade rolls out."""
        return self.model_copy(update={"version": self._version_needed()})

    def _version_needed(self) -> int:
        return 1


def _wire_name(name: str, on_the_wire: str) -> Any:
    """A field called name in the code and on_the_wire between services."""
    return Field(validation_alias=AliasChoices(on_the_wire, name), serialization_alias=on_the_wire)


class RecipientDsn(_Tolerant):
    notify: str = ""
    orcpt: str = ""


class DeliveryJob(WireMessage):
    """One delivery attempt of a message to a group of its recipients."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    queue_id: str
    # The record's dispatch count when the job was published (MessageRecord.
    # dispatches): which dispatch this job belongs to, not a recipient's attempts.
    dispatch: int = _wire_name("dispatch", "attempt")
    mail_from: str
    recipients: list[str]
    size: int
    body_store: BodyStore
    smtputf8: bool = False
    body_type: str = ""
    # Given only when this job carries every recipient still pending: the
    # record's revision as the job was published, and when the message was
    # received. If the job delivers them all and the record is still at that
    # revision, delivery removes the message itself (delivery/completion.py).
    record_revision: int | None = None
    received_at: float = 0.0
    # The DSN parameters (core/dsn_parameters.py), for a next hop that offers DSN;
    # recipient_dsn only has the recipients that gave NOTIFY or ORCPT.
    dsn_ret: str = ""
    dsn_envid: str = ""
    recipient_dsn: dict[str, RecipientDsn] = {}
    # The body, when the record holds it as part of its JSON (body_store
    # "record", CARRIED_BODY_LIMIT); None there: delivery reads the record.
    body: bytes | None = None
    # REQUIRETLS (RFC 8689; MessageRecord.require_tls).
    require_tls: bool = False
    # The namespace whose routes carry the message (core/tenancy.py).
    tenant: str = ""
    # Where delivery stores this job's result: the outcomes stream, which the
    # queue acknowledges in batches and which queues of earlier releases do not
    # read, when the queue that dispatched it says so; else the work queue
    # every release's queue reads (core/jetstream.py). A pod that does not
    # know the field uses the work queue.
    batched_results: bool = False

    @field_serializer("body_store")
    def _store_on_the_wire(self, where: BodyStore) -> str:
        # A pod of wire version 2 refuses a store it does not know as unreadable
        # and terminates the job; told "stream", it reads a job that carries its
        # body, sees version 3 and leaves it for a pod that reads it. (One that
        # leaves its body in the record says "record": a version 2 pod
        # terminates it, and the sweeper dispatches the message again.)
        return "stream" if where == "record" and self.body is not None else where

    @model_validator(mode="after")
    def _carried_body_is_the_records(self) -> Self:
        if self.body is not None:
            self.body_store = "record"
        return self

    def _version_needed(self) -> int:
        if self.body_store == "record" and self.body is None:
            return BODY_IN_RECORD_WIRE_VERSION
        if self.tenant:
            return TENANT_WIRE_VERSION
        if self.require_tls:
            return REQUIRE_TLS_WIRE_VERSION
        if self.body is not None:
            return BODY_WIRE_VERSION
        uses_dsn = self.dsn_ret or self.dsn_envid or self.recipient_dsn
        return DSN_WIRE_VERSION if uses_dsn else 1


Outcome = Literal["delivered", "deferred", "bounced"]


class RecipientOutcome(_Tolerant):
    address: str
    outcome: Outcome
    reply: str
    # Delivered, to a next hop that does not offer DSN, for a recipient whose
    # NOTIFY asked for SUCCESS: the queue owes the sender a "relayed" notice.
    relayed: bool = False


class DeliveryResult(WireMessage):
    queue_id: str
    # The dispatch of the job this result reports on (DeliveryJob.dispatch).
    dispatch: int = _wire_name("dispatch", "attempt")
    outcomes: list[RecipientOutcome]

    def _version_needed(self) -> int:
        return DSN_WIRE_VERSION if any(o.relayed for o in self.outcomes) else 1
