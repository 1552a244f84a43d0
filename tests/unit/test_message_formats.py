"""What older pods are given: the oldest wire version that carries a job's or a
result's meaning, and records without the fields a message does not use."""

from __future__ import annotations

import io
import json

import pytest
from kurrier.core.body_store import ATTACHED_BODY_LIMIT, place_body
from kurrier.core.jetstream import INLINE_BODY_LIMIT
from kurrier.core.message import (
    BODY_IN_RECORD_WIRE_VERSION,
    BODY_WIRE_VERSION,
    CARRIED_BODY_LIMIT,
    DSN_WIRE_VERSION,
    REQUIRE_TLS_WIRE_VERSION,
    DeliveryJob,
    DeliveryResult,
    MessageRecord,
    RecipientDsn,
    RecipientOutcome,
    RecipientState,
)


def _job(**dsn: object) -> DeliveryJob:
    return DeliveryJob.model_validate(
        {
            "queue_id": "Q1",
            "dispatch": 1,
            "mail_from": "a@b.test",
            "recipients": ["r@c.test"],
            "size": 1,
            "body_store": "stream",
            **dsn,
        }
    )


def test_only_jobs_and_results_using_dsn_need_version_2() -> None:
    assert _job().in_oldest_format().version == 1
    assert _job(dsn_envid="e").in_oldest_format().version == DSN_WIRE_VERSION
    notify = {"r@c.test": RecipientDsn(notify="NEVER")}
    assert _job(recipient_dsn=notify).in_oldest_format().version == DSN_WIRE_VERSION
    outcome = RecipientOutcome(address="r@c.test", outcome="delivered", reply="250 ok")
    result = DeliveryResult(queue_id="Q1", dispatch=1, outcomes=[outcome])
    assert result.in_oldest_format().version == 1
    relayed = outcome.model_copy(update={"relayed": True})
    result = DeliveryResult(queue_id="Q1", dispatch=1, outcomes=[relayed])
    assert result.in_oldest_format().version == DSN_WIRE_VERSION


def test_a_job_asking_for_requiretls_is_left_to_pods_that_honour_it() -> None:
    # A version 3 pod would send it over any TLS, or none.
    assert _job(require_tls=True).in_oldest_format().version == REQUIRE_TLS_WIRE_VERSION
    assert _job(require_tls=True, dsn_envid="e").in_oldest_format().version == (
        REQUIRE_TLS_WIRE_VERSION
    )


def test_records_store_only_the_fields_a_message_uses() -> None:
    record = MessageRecord(
        queue_id="Q1",
        mail_from="a@b.test",
        recipients=[RecipientState(address="r@c.test")],
        received_at=1.0,
        size=1,
        body_store="stream",
    )
    stored = json.loads(record.document())
    new_fields = {"dsn_ret", "dsn_envid", "delay_warned", "body"}
    assert not new_fields & set(stored)
    assert not {"notify", "orcpt", "relayed"} & set(stored["recipients"][0])
    assert MessageRecord.model_validate_json(record.document()) == record
    record.dsn_envid = "e"
    record.recipients[0].notify = "NEVER"
    stored = json.loads(record.document())
    assert (stored["dsn_envid"], stored["recipients"][0]["notify"]) == ("e", "NEVER")


def test_a_job_that_leaves_its_body_in_the_record_is_left_to_pods_that_read_it() -> None:
    # A version 5 pod would send an empty message; a version 2 pod refuses the
    # store and terminates the job, which the sweeper dispatches again.
    job = _job(body_store="record").in_oldest_format()
    assert (job.version, job.body) == (BODY_IN_RECORD_WIRE_VERSION, None)
    assert json.loads(job.model_dump_json())["body_store"] == "record"
    carried = _job(body=b"x").in_oldest_format()
    assert (carried.version, carried.body_store) == (BODY_WIRE_VERSION, "record")
    assert json.loads(carried.model_dump_json())["body_store"] == "stream"


# 8-bit octets, a NUL and what looks like JSON: all of it after the record's JSON.
ATTACHED = b'\x00{"queue_id": "Q2"}\xff\r\n' * (CARRIED_BODY_LIMIT // 16 + 1)


@pytest.mark.parametrize(
    ("body", "attached"),
    [(None, False), (b"small \xff\x00", False), (ATTACHED, True)],
    ids=["no body", "carried", "attached"],
)
def test_a_record_keeps_its_body_through_its_document(body: bytes | None, attached: bool) -> None:
    record = MessageRecord(
        queue_id="Q1",
        mail_from="a@b.test",
        recipients=[RecipientState(address="r@c.test")],
        received_at=1.0,
        size=len(body or b""),
        body_store="stream" if body is None else "record",
        body=body,
    )
    document = record.document()
    assert record.body_attached is attached
    # An attached body is stored as it is, after the JSON, not base64 inside it.
    assert document.endswith(b"\x00" + ATTACHED) is attached
    assert MessageRecord.from_document(document) == record


def _record(recipients: int) -> MessageRecord:
    return MessageRecord(
        queue_id="Q1",
        mail_from="a@b.test",
        recipients=[RecipientState(address=f"r{n}@c.test") for n in range(recipients)],
        received_at=1.0,
        size=0,
        body_store="stream",
    )


@pytest.mark.parametrize(
    ("size", "recipients", "in_record", "where"),
    [
        (CARRIED_BODY_LIMIT, 1, False, "record"),
        (ATTACHED_BODY_LIMIT, 1, True, "record"),
        (ATTACHED_BODY_LIMIT, 1, False, "stream"),
        (ATTACHED_BODY_LIMIT + 1, 1, True, "stream"),
        # Recipients enough that record and body are more than one stream message.
        (ATTACHED_BODY_LIMIT, 30_000, True, "stream"),
        (INLINE_BODY_LIMIT + 1, 1, True, "object"),
    ],
    ids=["carried", "attached", "backlog", "too large", "too many recipients", "object"],
)
def test_where_a_body_is_placed(size: int, recipients: int, in_record: bool, where: str) -> None:
    record = _record(recipients)
    placed = place_body(record, io.BytesIO(b"x" * size), size, in_record)
    assert placed.body_store == where
    assert placed.body == (b"x" * size if where == "record" else None)
    if where == "record":
        assert len(placed.document()) <= INLINE_BODY_LIMIT
