"""Delivery status notifications (RFC 3464): what the sender reads when mail fails (pure)."""

from __future__ import annotations

import email.utils
from dataclasses import dataclass

from kurrier.core.message import MessageRecord, RecipientState
from kurrier.core.smtp_text import enhanced_status, header_section

# The whole original goes back when it is this small; otherwise only its
# headers (text/rfc822-headers), as Postfix does with bounce_size_limit.
RETURN_FULL_MESSAGE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Notice:
    """A rendered notification: the message and the queue id it is stored under."""

    queue_id: str
    recipient: str
    content: bytes


def status_of(recipient: RecipientState) -> str:
    """The RFC 3463 status: the remote's enhanced code when it gave one."""
    status = enhanced_status(recipient.last_reply)
    if status:
        return status
    if recipient.status == "expired":
        return "4.4.7"  # delivery time expired, after temporary failures
    return "5.0.0"


def _explanation(failed: list[RecipientState], hostname: str) -> str:
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
    ]
    for recipient in failed:
        why = "delivery time expired" if recipient.status == "expired" else "refused"
        lines.append(f"<{recipient.address}>: {why}: {recipient.last_reply or 'no reply'}")
    return "\r\n".join(lines) + "\r\n"


def _per_recipient(recipient: RecipientState, now: float) -> str:
    diagnostic = recipient.last_reply.replace("\r", " ").replace("\n", " ")
    lines = [
        f"Final-Recipient: rfc822; {recipient.address}",
        "Action: failed",
        f"Status: {status_of(recipient)}",
    ]
    if diagnostic:
        lines.append(f"Diagnostic-Code: smtp; {diagnostic}")
    lines.append(f"Last-Attempt-Date: {email.utils.formatdate(now)}")
    return "\r\n".join(lines) + "\r\n"


def render_dsn(
    record: MessageRecord,
    failed: list[RecipientState],
    original: bytes,
    hostname: str,
    now: float,
) -> Notice:
    """The multipart/report returned to record.mail_from for the failed recipients."""
    queue_id = f"{record.queue_id}N{record.notices + 1}"
    boundary = f"{queue_id}.{int(now)}/{hostname}"
    status_fields = (
        f"Reporting-MTA: dns; {hostname}\r\n"
        f"X-Kurrier-Queue-ID: {record.queue_id}\r\n"
        f"Arrival-Date: {email.utils.formatdate(record.received_at)}\r\n"
    )
    per_recipient = "\r\n".join(_per_recipient(r, now) for r in failed)
    if len(original) <= RETURN_FULL_MESSAGE_LIMIT:
        returned_type, returned = "message/rfc822", original
    else:
        returned_type, returned = "text/rfc822-headers", header_section(original, scan_limit=None)
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{record.mail_from}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {email.utils.formatdate(now)}\r\n"
        f"Message-ID: <{queue_id}@{hostname}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f'\tboundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated message.\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"{_explanation(failed, hostname)}"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        f"{status_fields}\r\n{per_recipient}"
        "\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: Undelivered message\r\n"
        f"Content-Type: {returned_type}\r\n"
        "\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return Notice(queue_id=queue_id, recipient=record.mail_from, content=head + returned + tail)
