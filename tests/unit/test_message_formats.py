"""What older pods are given: the oldest wire version that carries a job's or a
result's meaning, and records without the fields a message does not use."""

from __future__ import annotations

import json

from kurrier.core.message import (
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
