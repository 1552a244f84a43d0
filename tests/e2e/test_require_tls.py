"""REQUIRETLS (RFC 8689) through the whole relay: taken only over TLS, carried with
the message (`kurrier queue show` says so), sent on only to hops that meet it,
and bounced (5.7.30) where none can.

The real `kurrier up` with STARTTLS on its SMTP port and certificates of the
test's CA; the next hops are real STARTTLS sinks on sockets; the client is
smtplib. The bounce is parsed back as an RFC 3464 report.
"""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path

from tests.support.certs import Certificates
from tests.support.dsn_report import parse_report
from tests.support.processes import free_port
from tests.support.relay import UpRelay, documents, route, trusting
from tests.support.sink import Sink

SENDER = "s@senders.test"
MESSAGE = b"From: s@senders.test\r\nSubject: secret\r\n\r\nfor TLS eyes only\r\n"


def test_requiretls_only_over_tls_then_delivered_or_bounced_per_hop(tmp_path: Path) -> None:
    certificates = Certificates(tmp_path / "tls")
    hop_tls = certificates.server_context("127.0.0.1")
    # Nothing listens on "down": its recipient waits in the queue, to be shown.
    ports = {name: free_port() for name in ("strong", "weak", "senders", "down")}
    config = documents(
        route("to-strong", ["strong.example"], ports["strong"]),
        route("to-weak", ["weak.example"], ports["weak"]),
        route("to-senders", ["senders.test"], ports["senders"]),
        route("to-down", ["down.example"], ports["down"]),
        trusting("127.0.0.0/8"),
    )
    client_tls = ssl.create_default_context(cafile=str(certificates.ca_file))
    with (
        Sink(ports["strong"], tls_context=hop_tls, require_tls=True) as strong,
        Sink(ports["weak"], tls_context=hop_tls) as weak,  # TLS, but no REQUIRETLS
        Sink(ports["senders"], tls_context=hop_tls, require_tls=True) as senders,
        UpRelay(
            tmp_path,
            config,
            "--tls-cert",
            str(certificates.server_cert),
            "--tls-key",
            str(certificates.server_key),
            "--tls-ca-file",
            str(certificates.ca_file),
        ) as relay,
        smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp,
    ):
        smtp.ehlo()
        assert not smtp.has_extn("requiretls")  # RFC 8689 3: only once TLS is on
        code, reply = smtp.mail(SENDER, options=["REQUIRETLS"])
        assert (code, reply[:6]) == (530, b"5.7.10"), reply
        smtp.starttls(context=client_tls)
        smtp.ehlo()
        assert smtp.has_extn("requiretls")
        code, reply = smtp.mail(SENDER, options=["REQUIRETLS=yes"])
        assert (code, reply[:5]) == (501, b"5.5.4"), reply
        assert smtp.mail(SENDER, options=["REQUIRETLS"])[0] == 250
        for recipient in ("a@strong.example", "b@weak.example", "c@down.example"):
            code, reply = smtp.rcpt(recipient, options=["REQUIRETLS"])
            assert (code, reply[:5]) == (501, b"5.5.4"), reply
            assert smtp.rcpt(recipient)[0] == 250
        code, reply = smtp.data(MESSAGE)
        assert code == 250, reply
        [delivered] = strong.wait_for(1)
        [notice] = senders.wait_for(1)
        shown = relay.queue_admin("show", reply.decode().rsplit(" ", 1)[-1])
    assert "\nREQUIRETLS:   yes\n" in shown.stdout, shown
    assert weak.messages == []
    assert delivered.tls and delivered.mail_parameters.split()[-1] == "REQUIRETLS"
    # The bounce quotes the message, so it travels under REQUIRETLS too.
    assert notice.tls and notice.mail_parameters.split()[-1] == "REQUIRETLS"
    report = parse_report(notice.content)
    [group] = report.per_recipient
    assert group["Final-Recipient"] == "rfc822; b@weak.example"
    assert (group["Action"], group["Status"]) == ("failed", "5.7.30")
    assert "does not offer REQUIRETLS" in group["Diagnostic-Code"]
