"""Delivery status notifications (RFC 3464): what the sender reads when mail fails,
is delayed, or was relayed where no later hop reports on it (pure).

The DSN parameters the sender gave (RFC 3461, core/dsn_parameters.py) shape
them: the report names the ENVID and each ORCPT, and RET=HDRS returns only
the original's headers. Which recipients a notice covers is the caller's
choice (queue/manager.py).
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass

from kurrier.core.message import MessageRecord, RecipientState
from kurrier.core.smtp_text import enhanced_status, header_section

# The whole original goes back when it is this small; otherwise only its
# headers (text/rfc822-headers), as Postfix does with bounce_size_limit.
RETURN_FULL_MESSAGE_LIMIT = 64 * 1024


@dataclass(frozen=True)
class NoticeKind:
    """One kind of notification: failure, delay or success (RFC 3464 Action)."""

    action: str
    # The NOTIFY condition (RFC 3461 4.1) a recipient asks for this kind with.
    condition: str
    subject: str
    explanation: str
    # How each recipient is described in the explanation.
    what_happened: str
    # Whether the original may come back whole; RFC 3461 4.3: a notice other
    # than a failure returns the headers only, whatever RET says.
    may_return_full: bool
    returned_description: str


FAILED = NoticeKind(
    action="failed",
    condition="FAILURE",
    subject="Undelivered Mail Returned to Sender",
    explanation=(
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients. It's attached below."
    ),
    what_happened="refused",
    may_return_full=True,
    returned_description="Undelivered message",
)
DELAYED = NoticeKind(
    action="delayed",
    condition="DELAY",
    subject="Delayed Mail (still being retried)",
    explanation=(
        "THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE.\r\n"
        "\r\n"
        "Your message could not yet be delivered to the recipients below.\r\n"
        "It is still being retried; you will hear again if it fails."
    ),
    what_happened="delayed",
    may_return_full=False,
    returned_description="Headers of the delayed message",
)
RELAYED = NoticeKind(
    action="relayed",
    condition="SUCCESS",
    subject="Successful Mail Delivery Report",
    explanation=(
        "Your message was relayed to the recipients below, to a next hop that\r\n"
        "does not offer delivery notifications: you will hear nothing more\r\n"
        "of its delivery from there, though errors may still be reported."
    ),
    what_happened="relayed",
    may_return_full=False,
    returned_description="Headers of the relayed message",
)


@dataclass(frozen=True)
class Notice:
    """A rendered notification: the message and the queue id it is stored under."""

    queue_id: str
    recipient: str
    content: bytes


def status_of(recipient: RecipientState, kind: NoticeKind = FAILED) -> str:
    """The RFC 3463 status: the remote's enhanced code when it gave one."""
    status = enhanced_status(recipient.last_reply)
    if status:
        return status
    if kind is not FAILED:
        return "2.0.0" if kind is RELAYED else "4.0.0"
    if recipient.status == "expired":
        return "4.4.7"  # delivery time expired, after temporary failures
    return "5.0.0"


def _explanation(kind: NoticeKind, recipients: list[RecipientState], hostname: str) -> str:
    lines = [f"This is the mail system at host {hostname}.", "", kind.explanation, ""]
    for recipient in recipients:
        what = kind.what_happened
        if recipient.status == "expired":
            what = "delivery time expired"
        lines.append(f"<{recipient.address}>: {what}: {recipient.last_reply or 'no reply'}")
    return "\r\n".join(lines) + "\r\n"


def _per_message(record: MessageRecord, hostname: str) -> str:
    lines = [f"Original-Envelope-Id: {record.dsn_envid}"] if record.dsn_envid else []
    lines += [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Kurrier-Queue-ID: {record.queue_id}",
        f"Arrival-Date: {email.utils.formatdate(record.received_at)}",
    ]
    return "\r\n".join(lines) + "\r\n"


def _per_recipient(
    kind: NoticeKind, recipient: RecipientState, now: float, will_retry_until: float | None
) -> str:
    diagnostic = recipient.last_reply.replace("\r", " ").replace("\n", " ")
    lines = [f"Original-Recipient: {recipient.orcpt}"] if recipient.orcpt else []
    lines += [
        f"Final-Recipient: rfc822; {recipient.address}",
        f"Action: {kind.action}",
        f"Status: {status_of(recipient, kind)}",
    ]
    if diagnostic:
        lines.append(f"Diagnostic-Code: smtp; {diagnostic}")
    lines.append(f"Last-Attempt-Date: {email.utils.formatdate(now)}")
    if will_retry_until is not None:
        lines.append(f"Will-Retry-Until: {email.utils.formatdate(will_retry_until)}")
    return "\r\n".join(lines) + "\r\n"


def _returned(kind: NoticeKind, record: MessageRecord, original: bytes) -> tuple[str, bytes]:
    """The third part: the original whole when it may come back so, else its headers."""
    whole = kind.may_return_full and record.dsn_ret != "HDRS"
    if whole and len(original) <= RETURN_FULL_MESSAGE_LIMIT:
        return "message/rfc822", original
    return "text/rfc822-headers", header_section(original, scan_limit=None)


def render_dsn(
    record: MessageRecord,
    recipients: list[RecipientState],
    original: bytes,
    hostname: str,
    now: float,
    kind: NoticeKind = FAILED,
    will_retry_until: float | None = None,
) -> Notice:
    """The multipart/report sent to record.mail_from about these recipients."""
    queue_id = f"{record.queue_id}N{record.notices + 1}"
    boundary = f"{queue_id}.{int(now)}/{hostname}"
    per_recipient = "\r\n".join(_per_recipient(kind, r, now, will_retry_until) for r in recipients)
    returned_type, returned = _returned(kind, record, original)
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{record.mail_from}>\r\n"
        f"Subject: {kind.subject}\r\n"
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
        f"{_explanation(kind, recipients, hostname)}"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        f"{_per_message(record, hostname)}\r\n{per_recipient}"
        "\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: {kind.returned_description}\r\n"
        f"Content-Type: {returned_type}\r\n"
        "\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return Notice(queue_id=queue_id, recipient=record.mail_from, content=head + returned + tail)
