"""Reading SMTP text (kurrier.core.smtp_text): header sections and reply codes."""

from __future__ import annotations

import pytest
from kurrier.core.smtp_text import HEADER_SCAN_LIMIT, enhanced_status, header_section, reply_code


def test_the_header_section_ends_with_the_crlf_before_the_blank_line() -> None:
    message = b"Subject: x\r\nFrom: a@b\r\n\r\nbody\r\n\r\nmore\r\n"
    assert header_section(message) == b"Subject: x\r\nFrom: a@b\r\n"
    assert header_section(b"Subject: x\r\n") == b"Subject: x\r\n", "no body: all of it"


def test_the_header_section_is_looked_for_in_the_first_64_kib_unless_told_otherwise() -> None:
    long_headers = b"X-Long: " + b"x" * HEADER_SCAN_LIMIT + b"\r\n\r\nbody"
    assert header_section(long_headers) == long_headers[:HEADER_SCAN_LIMIT]
    assert header_section(long_headers, scan_limit=None) == long_headers[: -len(b"\r\nbody")]
    assert header_section(b"A: b\r\n\r\n" + b"x" * HEADER_SCAN_LIMIT) == b"A: b\r\n"


@pytest.mark.parametrize(
    ("reply", "code", "status"),
    [
        ("250 2.0.0 Ok: queued as 01ABC", 250, "2.0.0"),
        ("550 5.1.1 <nobody@example.com>: no such user", 550, "5.1.1"),
        ("451 4.4.2 mx.example.com: timed out", 451, "4.4.2"),
        ("550 5.1.10 RESOLVER.ADR.RecipientNotFound", 550, "5.1.10"),
        ("550 5.1.1\n5.1.1 the second line", 550, "5.1.1"),  # a multi-line reply as stored
        ("550-5.1.1 on the wire, not the last line", 550, "5.1.1"),
        ("250 2.0.0", 250, "2.0.0"),
        ("554 5.7.1: relay access denied", 554, "5.7.1"),
        ("550  5.1.1 an extra space", 550, "5.1.1"),
        ("554 no enhanced code", 554, ""),
        ("503 Error: need MAIL command", 503, ""),
        ("550 5.1.1.2 not a status code", 550, ""),
        ("550 6.1.1 no such class", 550, ""),
        ("550 5.1.1234", 550, ""),
        ("550 ", 550, ""),
        ("5.1.1 no basic code", 0, ""),
        ("timeout", 0, ""),
        ("", 0, ""),
        ("55", 0, ""),
        ("\uff15\uff15\uff10 5.1.1 fullwidth digits", 0, ""),
    ],
)
def test_reply_codes(reply: str, code: int, status: str) -> None:
    assert reply_code(reply) == code
    assert enhanced_status(reply) == status
