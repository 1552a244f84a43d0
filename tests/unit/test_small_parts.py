"""Durations, host:port parsing, retry schedule, SMTP wire encoding, queue ids, models."""

from __future__ import annotations

import random

import pytest
from kurrier.core.addresses import format_host_port, parse_host_port
from kurrier.core.durations import parse_duration
from kurrier.core.message import DeliveryJob, MessageRecord, new_queue_id
from kurrier.delivery.smtp_client import to_wire_body
from kurrier.queue.retry_schedule import RetrySchedule
from pydantic import ValidationError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2), ("5m", 300), ("1h30m", 5400), ("5d", 432000), ("1.5s", 1.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "m5", "5m junk", "-1s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_host_port() -> None:
    assert parse_host_port("127.0.0.1:25") == ("127.0.0.1", 25)
    assert parse_host_port("[::1]:587") == ("::1", 587)
    assert parse_host_port(":25") == ("0.0.0.0", 25)
    assert format_host_port("::1", 25) == "[::1]:25"
    for bad in ("localhost", "h:port", "h:70000"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


def test_retry_schedule_grows_and_caps() -> None:
    schedule = RetrySchedule(min_backoff=10, max_backoff=100, max_lifetime=1000, jitter=0)
    assert [schedule.delay(n) for n in (1, 2, 3, 4, 5, 9)] == [10, 20, 40, 80, 100, 100]
    jittery = RetrySchedule(min_backoff=100, max_backoff=1000, jitter=0.1)
    delays = {round(jittery.delay(1, random.Random(seed))) for seed in range(50)}
    assert min(delays) >= 90 and max(delays) <= 110 and len(delays) > 5
    assert schedule.expired(received_at=0, now=1000)
    assert not schedule.expired(received_at=0, now=999)


def test_wire_body_dot_stuffing() -> None:
    # SmtpSession.send ends a body without a final CRLF with one before this.
    assert to_wire_body(b".a\r\nb\r\n.\r\n..c\r\n") == b"..a\r\nb\r\n..\r\n...c\r\n.\r\n"


def test_queue_ids_sort_by_time_and_are_unique() -> None:
    ids = [new_queue_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 20 and i.isalnum() for i in ids)


def test_a_job_from_a_newer_queue_is_read_a_record_with_strange_fields_is_not() -> None:
    # Jobs cross between services deployed one after the other: a field an
    # older delivery pod does not know is ignored. A record is the queue's own
    # truth: a field nobody wrote is corruption, refused.
    job = DeliveryJob.model_validate_json(
        b'{"queue_id": "Q", "attempt": 1, "mail_from": "", "recipients": ["r@example.com"],'
        b' "size": 1, "body_store": "stream", "added_later": true}'
    )
    assert job.recipients == ["r@example.com"] and job.record_revision is None
    with pytest.raises(ValidationError, match="added_later"):
        MessageRecord.model_validate_json(
            b'{"queue_id": "Q", "mail_from": "", "recipients": [], "received_at": 0,'
            b' "size": 1, "body_store": "stream", "added_later": true}'
        )
