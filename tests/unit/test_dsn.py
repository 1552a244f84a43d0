"""DSN rendering (RFC 3464) and which notices a change owes, without a queue: status
codes, what comes back to the sender, and what the DSN parameters (RFC 3461) change."""

from __future__ import annotations

from kurrier.core.message import MessageRecord, RecipientState, RecipientStatus
from kurrier.queue.dsn import (
    DELAYED,
    FAILED,
    RELAYED,
    RETURN_FULL_MESSAGE_LIMIT,
    render_dsn,
    status_of,
)
from kurrier.queue.notices import take_owed_notices
from kurrier.queue.retry_schedule import RetrySchedule

from tests.support.dsn_report import parse_report


def _record() -> MessageRecord:
    return MessageRecord(
        queue_id="01ABCDEF0123456789AB",
        mail_from="alice@senders.test",
        recipients=[],
        received_at=0.0,
        size=0,
        body_store="stream",
        notices=1,
    )


def _returned_part_type(content: bytes) -> str:
    return parse_report(content).returned.get_content_type()


def test_status_comes_from_the_remote_reply_when_it_has_one() -> None:
    assert status_of(
        RecipientState(address="a@b", status="bounced", last_reply="550 5.1.1 no")
    ) == ("5.1.1")
    assert (
        status_of(RecipientState(address="a@b", status="bounced", last_reply="554 no")) == "5.0.0"
    )
    assert status_of(RecipientState(address="a@b", status="expired", last_reply="timeout")) == (
        "4.4.7"
    )


def test_small_originals_come_back_whole_large_ones_as_headers() -> None:
    failed = [RecipientState(address="bob@example.com", status="bounced", last_reply="550 x")]
    small = b"Subject: small\r\n\r\nshort body\r\n"
    notice = render_dsn(_record(), failed, small, "relay.test", 0.0)
    assert notice.queue_id == "01ABCDEF0123456789ABN2"
    assert notice.recipient == "alice@senders.test"
    assert _returned_part_type(notice.content) == "message/rfc822"
    assert b"short body" in notice.content

    large = b"Subject: large\r\n\r\n" + b"x" * (RETURN_FULL_MESSAGE_LIMIT + 1)
    notice = render_dsn(_record(), failed, large, "relay.test", 0.0)
    assert _returned_part_type(notice.content) == "text/rfc822-headers"
    assert b"Subject: large" in notice.content
    assert b"xxxx" not in notice.content


def test_report_carries_envid_orcpt_and_ret_hdrs_returns_headers() -> None:
    record = _record().model_copy(update={"dsn_ret": "HDRS", "dsn_envid": "Batch 7+x"})
    failed = [
        RecipientState(
            address="bob@example.com",
            status="bounced",
            last_reply="550 5.1.1 no",
            orcpt="rfc822;Bob@Example.com",
        ),
        RecipientState(address="eve@example.com", status="expired", last_reply="451 later"),
    ]
    notice = render_dsn(record, failed, b"Subject: small\r\n\r\nbody\r\n", "relay.test", 0.0)
    report = parse_report(notice.content)
    assert report.per_message["Original-Envelope-Id"] == "Batch 7+x"
    assert report.recipient("bob@example.com")["Original-Recipient"] == "rfc822;Bob@Example.com"
    assert report.recipient("eve@example.com")["Original-Recipient"] is None
    assert [g["Action"] for g in report.per_recipient] == ["failed", "failed"]
    assert report.returned.get_content_type() == "text/rfc822-headers"
    assert b"body" not in notice.content.split(b"text/rfc822-headers")[1]


def test_delay_and_relayed_notices_return_headers_only_whatever_ret() -> None:
    record = _record().model_copy(update={"dsn_ret": "FULL"})
    original = b"Subject: small\r\n\r\nthe body\r\n"
    waiting = RecipientState(address="w@example.com", status="deferred", last_reply="451 busy")
    delayed = render_dsn(record, [waiting], original, "relay.test", 0.0, DELAYED, 86400.0)
    report = parse_report(delayed.content)
    assert report.message["Subject"] == "Delayed Mail (still being retried)"
    [group] = report.per_recipient
    assert (group["Action"], group["Status"]) == ("delayed", "4.0.0")
    assert group["Will-Retry-Until"] is not None
    assert report.returned.get_content_type() == "text/rfc822-headers"
    assert b"the body" not in delayed.content

    sent = RecipientState(address="s@example.com", status="delivered", last_reply="250 ok")
    relayed = parse_report(render_dsn(record, [sent], original, "relay.test", 0.0, RELAYED).content)
    [group] = relayed.per_recipient
    assert (group["Action"], group["Status"]) == ("relayed", "2.0.0")
    assert relayed.returned.get_content_type() == "text/rfc822-headers"


def _changed(record: MessageRecord, **statuses: RecipientStatus) -> list[str]:
    """Statuses before, then the record's recipients moved to the given statuses."""
    before: list[str] = [r.status for r in record.recipients]
    for state in record.recipients:
        state.status = statuses.get(state.address.split("@")[0], state.status)
        state.last_reply = state.last_reply or "451 try later"
    return before


def _recipients(*given: tuple[str, str]) -> MessageRecord:
    return _record().model_copy(
        update={"recipients": [RecipientState(address=f"{a}@x.test", notify=n) for a, n in given]}
    )


def test_notify_decides_who_hears_of_failure_and_success() -> None:
    schedule = RetrySchedule(delay_warning=0)
    record = _recipients(
        ("dflt", ""), ("never", "NEVER"), ("succ", "SUCCESS"), ("all", "SUCCESS,FAILURE")
    )
    before = _changed(record, dflt="bounced", never="bounced", succ="expired", all="bounced")
    [notice] = take_owed_notices(record, before, schedule, now=10.0)
    assert notice.kind is FAILED
    assert [r.address for r in notice.recipients] == ["dflt@x.test", "all@x.test"]

    record = _recipients(("dflt", ""), ("succ", "SUCCESS"), ("plain", "SUCCESS"))
    before = _changed(record, dflt="delivered", succ="delivered", plain="delivered")
    for state in record.recipients[:2]:
        state.relayed = True  # to a next hop without DSN; "plain" went to one with it
    [notice] = take_owed_notices(record, before, schedule, now=10.0)
    assert notice.kind is RELAYED
    assert [r.address for r in notice.recipients] == ["succ@x.test"]


def test_one_delay_warning_per_message_after_the_age_to_whom_asks() -> None:
    schedule = RetrySchedule(delay_warning=60.0, max_lifetime=600.0)
    record = _recipients(("dflt", ""), ("fail", "FAILURE"), ("delay", "DELAY"), ("done", ""))
    before = _changed(record, dflt="deferred", fail="deferred", delay="deferred", done="delivered")
    assert take_owed_notices(record, before, schedule, now=59.0) == []
    assert not record.delay_warned
    [notice] = take_owed_notices(record, before, schedule, now=60.0)
    assert notice.kind is DELAYED
    assert [r.address for r in notice.recipients] == ["dflt@x.test", "delay@x.test"]
    assert notice.will_retry_until == 600.0
    assert record.delay_warned
    assert take_owed_notices(record, before, schedule, now=120.0) == []
    # 0 turns warnings off.
    record = _recipients(("dflt", ""))
    before = _changed(record, dflt="deferred")
    assert take_owed_notices(record, before, RetrySchedule(delay_warning=0), now=1e9) == []
