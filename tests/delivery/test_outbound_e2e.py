"""Outbound through the whole relay (`kurrier up --dns-resolver --mx-port --tls-ca-file`).

SMTP in, the queue in JetStream, then delivery by MX with a verified
certificate and a DKIM signature; a null MX bounce reaching the sender; and
wrong smarthost credentials deferring with the server's reply in the record.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import dkim
from kurrier.core.dkim_keys import dkim_txt_record

from tests.support.certs import TestCA, private_pem, rsa_key, self_signed_context
from tests.support.dns_server import DnsServer
from tests.support.processes import wait_until
from tests.support.relay import (
    UpRelay,
    documents,
    message_records,
    mx_route,
    route,
    secret,
    signing_domain,
    trusting,
    wait_until_drained,
)
from tests.support.sink import Sink


def _relay(tmp_path: Path, config: str, dns: DnsServer, port: int, ca: TestCA) -> UpRelay:
    return UpRelay(
        tmp_path,
        config,
        "--dns-resolver",
        dns.address,
        "--mx-port",
        str(port),
        "--tls-ca-file",
        str(ca.ca_file),
    )


def _send(relay: UpRelay, sender: str, recipient: str, subject: str) -> None:
    content = f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\nHello.\r\n"
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
        smtp.sendmail(sender, [recipient], content.encode())


def test_mx_delivery_with_verified_tls_and_a_dkim_signature(
    tmp_path: Path, dns_server: DnsServer, mx_port: int, test_ca: TestCA
) -> None:
    key = private_pem(rsa_key()).decode()
    dns_server.add("dest.test", "MX", "10 mx1.dest.test.", "20 mx2.dest.test.")
    dns_server.add("mx1.dest.test", "A", "127.0.0.2")  # nothing listens: fail over
    dns_server.add("mx2.dest.test", "A", "127.0.0.3")
    config = documents(
        secret("signed-dkim", **{"private.pem": key}),
        signing_domain("signed.test", "k1", "signed-dkim"),
        mx_route("by-mx", ["*"], tls="verify"),
        trusting("127.0.0.0/8"),
    )
    tls = test_ca.server_context("mx2.dest.test")
    with (
        Sink(mx_port, "127.0.0.3", tls_context=tls) as sink,
        _relay(tmp_path, config, dns_server, mx_port, test_ca) as relay,
    ):
        _send(relay, "alice@signed.test", "bob@dest.test", "via mx")
        [delivered] = sink.wait_for(1)
        wait_until_drained(relay.nats_url, 30)
    assert delivered.tls
    assert delivered.recipients == ("bob@dest.test",)
    name, value = dkim_txt_record(key, "k1", "signed.test")
    published = {f"{name}.".encode(): value.encode()}
    assert dkim.verify(delivered.content, dnsfunc=lambda qname, timeout=5: published.get(qname))


def test_null_mx_bounces_back_to_the_sender(
    tmp_path: Path, dns_server: DnsServer, mx_port: int, test_ca: TestCA
) -> None:
    dns_server.add("nomail.test", "MX", "0 .")
    dns_server.add("senders.test", "MX", "10 mx.senders.test.")
    dns_server.add("mx.senders.test", "A", "127.0.0.4")
    config = documents(mx_route("by-mx", ["*"]), trusting("127.0.0.0/8"))
    with (
        Sink(mx_port, "127.0.0.4") as senders,
        _relay(tmp_path, config, dns_server, mx_port, test_ca) as relay,
    ):
        _send(relay, "carol@senders.test", "anyone@nomail.test", "to nowhere")
        [notice] = senders.wait_for(1)
        wait_until_drained(relay.nats_url, 30)
    assert notice.mail_from == "<>"  # the null sender, as aiosmtpd spells it
    assert notice.recipients == ("carol@senders.test",)
    assert b"Status: 5.1.10" in notice.content
    assert b"556 5.1.10" in notice.content


def test_wrong_smarthost_credentials_defer_with_the_reply_recorded(
    tmp_path: Path, dns_server: DnsServer, mx_port: int, test_ca: TestCA
) -> None:
    with Sink(
        tls_context=self_signed_context(tmp_path, "127.0.0.1"), users={"relay": "right"}
    ) as smarthost:
        config = documents(
            secret("creds", username="relay", password="wrong"),
            route(
                "via-smarthost",
                ["*"],
                smarthost.port,
                tls="required",
                auth="{secretRef: {name: creds}}",
            ),
            trusting("127.0.0.0/8"),
        )
        with _relay(tmp_path, config, dns_server, mx_port, test_ca) as relay:
            _send(relay, "dave@client.test", "erin@dest.test", "refused login")

            def deferred_with_the_reply() -> bool:
                records = message_records(relay.nats_url)
                return any(
                    r.status == "deferred" and "535 5.7.8" in r.last_reply
                    for record in records
                    for r in record.recipients
                )

            wait_until(deferred_with_the_reply, 30, "the recipient deferred with the 535 reply")
            [record] = message_records(relay.nats_url)
        assert smarthost.messages == []
    [recipient] = record.recipients
    assert recipient.history[0].reply.startswith("451 4.7.0 ")
    assert "AUTH failed: 535 5.7.8" in recipient.history[0].reply
    assert smarthost.auth_attempts[0][:2] == ("PLAIN", "relay")
