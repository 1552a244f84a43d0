"""TLS on ingress, on raw sockets: STARTTLS injection, state reset, versions, Received, reload."""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import threading
import uuid
import warnings
from pathlib import Path

from cryptography import x509

from tests.ingress.conftest import PASSWORDS, HostileRelay, fresh_ip
from tests.ingress.smtp_probe import SmtpProbe, client_tls, plain
from tests.support.certs import self_signed_context
from tests.support.metrics import value
from tests.support.processes import wait_until


def test_commands_pipelined_with_starttls_are_discarded(hostile_relay: HostileRelay) -> None:
    """CVE-2011-0411: bytes sent in the clear after STARTTLS must not run inside TLS."""
    with SmtpProbe(hostile_relay.submission_port, fresh_ip()) as smtp:
        smtp.reply()
        assert smtp.command("EHLO probe.test").code == 250
        # One segment: STARTTLS plus commands an attacker on the path injected.
        smtp.send(
            b"STARTTLS\r\nEHLO injected.test\r\n"
            + plain("alice", PASSWORDS["alice"]).encode()
            + b"\r\nMAIL FROM:<alice@alice.test>\r\n"
        )
        assert smtp.reply().startswith("220")
        smtp.sock = client_tls().wrap_socket(smtp.sock, server_hostname="relay.test")
        # Had the injected lines run, their replies would come first and the
        # session would be authenticated with a transaction open.
        first = smtp.command("NOOP")
        assert first.lines == ("250 OK",), first
        assert smtp.command("MAIL FROM:<alice@alice.test>").startswith("503 5.5.1"), (
            "no EHLO after STARTTLS: the injected EHLO must not count"
        )
        smtp.command("EHLO probe.test")
        assert smtp.command("MAIL FROM:<alice@alice.test>").startswith("553 5.7.1"), (
            "the injected AUTH must not count"
        )


def test_starttls_resets_the_session(hostile_relay: HostileRelay) -> None:
    """RFC 3207 4.2: after TLS, nothing from before it is remembered."""
    with SmtpProbe(hostile_relay.smtp_port, fresh_ip()) as smtp:
        smtp.reply()
        smtp.command("EHLO probe.test")
        assert smtp.command("MAIL FROM:<someone@client.test>").code == 250
        assert smtp.starttls().code == 220
        assert smtp.command("RCPT TO:<user@example.com>").startswith("503"), "HELO state kept"
        smtp.command("EHLO probe.test")
        assert smtp.command("RCPT TO:<user@example.com>").startswith("503 5.5.1"), "MAIL kept"


def _old_tls_client() -> ssl.SSLContext:
    """A client that offers TLS 1.0 and 1.1 only, with every cipher its OpenSSL has."""
    context = client_tls()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")
    return context


def _version_agreed_with_a_lenient_server(client: ssl.SSLContext, directory: Path) -> str:
    """Handshake with a server that allows TLS 1.0: what this client can really speak."""
    server = self_signed_context(directory, "lenient.test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1
    server.set_ciphers("ALL:@SECLEVEL=0")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        serving = threading.Thread(
            target=lambda: server.wrap_socket(theirs, server_side=True).close(), daemon=True
        )
        serving.start()
        with client.wrap_socket(ours, server_hostname="lenient.test") as tls:
            version = tls.version()
        serving.join(10)
    assert version is not None
    return version


# How a server turns away a ClientHello it will not serve: a protocol_version
# alert, or hanging up on it (asyncio's TLS, which ingress uses, hangs up).
# Not among them: NO_PROTOCOLS_AVAILABLE and the like, this client's own
# OpenSSL refusing before it sends anything.
SERVER_REFUSALS = {"TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING", "reset"}


def test_tls_below_1_2_is_refused(hostile_relay: HostileRelay, tmp_path: Path) -> None:
    context = _old_tls_client()
    # The refusal below must be the relay's: this client does speak TLS 1.1 when let.
    assert _version_agreed_with_a_lenient_server(context, tmp_path) == "TLSv1.1"
    with socket.create_connection(("127.0.0.1", hostile_relay.smtps_port), 10) as raw:
        try:
            context.wrap_socket(raw, server_hostname="relay.test")
        except ConnectionResetError:
            refusal = "reset"
        except ssl.SSLError as error:
            refusal = str(error.reason)
        else:
            raise AssertionError("a TLS 1.1 handshake succeeded")
    assert refusal in SERVER_REFUSALS, refusal
    # And the same port speaks TLS 1.2 or later: it was the version it refused.
    with SmtpProbe(hostile_relay.smtps_port, fresh_ip(), implicit_tls=True) as smtp:
        assert smtp.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]


def test_received_names_the_tls_version_and_cipher(hostile_relay: HostileRelay) -> None:
    marker = uuid.uuid4().hex
    with SmtpProbe(hostile_relay.smtps_port, fresh_ip(), implicit_tls=True) as smtp:
        smtp.reply()
        smtp.command("EHLO probe.test")
        # Not carol: test_limits.py spends carol's message rate, in the same relay.
        assert smtp.command(plain("bob", PASSWORDS["bob"])).code == 235
        assert smtp.command("MAIL FROM:<bob@mail.bob.test>").code == 250
        assert smtp.command("RCPT TO:<someone@example.com>").code == 250
        assert smtp.command("DATA").code == 354
        smtp.send(f"Subject: {marker}\r\n\r\nhello\r\n.\r\n".encode())
        assert smtp.reply().code == 250
        version = smtp.sock.version()  # type: ignore[attr-defined]
        cipher = smtp.sock.cipher()[0]  # type: ignore[attr-defined]

    def arrived() -> bool:
        return any(marker.encode() in m.content for m in hostile_relay.sink.messages)

    wait_until(arrived, 60, "the message at the sink")
    [message] = [m for m in hostile_relay.sink.messages if marker.encode() in m.content]
    received = message.content.split(b"\r\n\r\n")[0].decode()
    assert f"(using {version} with cipher {cipher} (" in received, received
    assert "with ESMTPSA id" in received, received


def _served_certificate(port: int) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), 10) as raw,
        client_tls().wrap_socket(raw, server_hostname="relay.test") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def _served_fingerprint(port: int) -> str:
    return hashlib.sha256(_served_certificate(port)).hexdigest()


def _expiry_reported_and_served(relay: HostileRelay) -> tuple[float, float]:
    """The ingress's certificate expiry metric, and the expiry of the certificate it serves."""
    reported = value(
        relay.relay.metrics_ports["ingress"], "kurrier_tls_certificate_expiry_timestamp_seconds"
    )
    served = x509.load_der_x509_certificate(_served_certificate(relay.smtps_port))
    return reported, served.not_valid_after_utc.timestamp()


def test_a_renewed_certificate_is_served_without_a_restart(hostile_relay: HostileRelay) -> None:
    certificates = hostile_relay.certificates
    before = _served_fingerprint(hostile_relay.smtps_port)
    reported, served = _expiry_reported_and_served(hostile_relay)
    assert reported == served
    renewed = certificates.server_cert.parent / "renewed"
    cert, key = certificates.issue("relay.test", directory=renewed)
    # A half-done renewal (new certificate, old key) must be ignored, not break TLS.
    shutil.copy(cert, certificates.server_cert)
    wait_until(
        lambda: "new TLS certificate not loaded" in hostile_relay.ingress_log.read_text(),
        30,
        "the mismatched pair to be rejected",
    )
    assert _served_fingerprint(hostile_relay.smtps_port) == before
    shutil.copy(key, certificates.server_key)
    wait_until(
        lambda: _served_fingerprint(hostile_relay.smtps_port) != before,
        30,
        "the renewed certificate to be served",
    )
    with SmtpProbe(hostile_relay.submission_port, fresh_ip()) as smtp:
        smtp.reply()
        smtp.command("EHLO probe.test")
        assert smtp.starttls().code == 220
        der = smtp.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert hashlib.sha256(der).hexdigest() != before
    # The expiry alert follows the renewal (the renewed certificate was issued later).
    reported_now, served_now = _expiry_reported_and_served(hostile_relay)
    assert reported_now == served_now > served
