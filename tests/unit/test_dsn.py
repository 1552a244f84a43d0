"""DSN rendering (RFC 3464) without a queue: status codes and what comes back to the sender."""

from __future__ import annotations

import email
import email.message

from kurrier.core.message import MessageRecord, RecipientState
from kurrier.queue.dsn import RETURN_FULL_MESSAGE_LIMIT, render_dsn, status_of


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
    parts = email.message_from_bytes(content).get_payload()
    assert isinstance(parts, list)
    returned = parts[2]
    assert isinstance(returned, email.message.Message)
    return returned.get_content_type()


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
