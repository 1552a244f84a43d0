"""Reading back a delivery status notification with Python's email package.

Every DSN a test sees goes through parse_report, which checks what RFC 3464
requires of it: a multipart/report of report-type delivery-status, a
human-readable part, a message/delivery-status part with Reporting-MTA and,
per recipient, Final-Recipient, Action and Status, then the original (whole
or its headers).
"""

from __future__ import annotations

import email
import email.message
import re
from dataclasses import dataclass

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True)
class Report:
    message: email.message.Message
    explanation: str
    per_message: email.message.Message
    per_recipient: list[email.message.Message]
    # The original as it came back: message/rfc822 or text/rfc822-headers.
    returned: email.message.Message

    def recipient(self, address: str) -> email.message.Message:
        [found] = [
            group for group in self.per_recipient if group["Final-Recipient"].endswith(address)
        ]
        return found


def parse_report(content: bytes) -> Report:
    message = email.message_from_bytes(content)
    assert message.get_content_type() == "multipart/report", message.get_content_type()
    assert message.get_param("report-type") == "delivery-status"
    [human, status, returned] = _parts(message)
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert returned.get_content_type() in ("message/rfc822", "text/rfc822-headers")
    per_message, *per_recipient = _parts(status)
    assert per_message["Reporting-MTA"].startswith("dns; "), per_message["Reporting-MTA"]
    assert per_recipient, "a report names at least one recipient"
    for group in per_recipient:
        assert group["Final-Recipient"].startswith("rfc822; "), group["Final-Recipient"]
        assert group["Action"] in ACTIONS, group["Action"]
        assert _STATUS.fullmatch(group["Status"]), group["Status"]
    explanation = human.get_payload(decode=True)
    assert isinstance(explanation, bytes)
    return Report(message, explanation.decode(), per_message, per_recipient, returned)


def _parts(message: email.message.Message) -> list[email.message.Message]:
    parts = message.get_payload()
    assert isinstance(parts, list)
    assert all(isinstance(part, email.message.Message) for part in parts)
    return [part for part in parts if isinstance(part, email.message.Message)]
