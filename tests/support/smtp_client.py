"""kurrier's own SMTP client (delivery/smtp_client.py), to a plaintext peer in tests."""

from __future__ import annotations

from collections.abc import Awaitable

from kurrier.delivery.smtp_client import SmtpSession


def plain_session(
    port: int,
    host: str = "127.0.0.1",
    *,
    server_name: str = "sink.test",
    helo_name: str = "relay.test",
) -> Awaitable[SmtpSession]:
    """A session without TLS, as delivery opens one for a route with `tls: {mode: none}`."""
    return SmtpSession.open(
        host,
        port,
        server_name=server_name,
        helo_name=helo_name,
        tls_mode="none",
        tls_context=None,
        timeout=10,
        connect_timeout=10,
    )
