"""A RelayDomain that lists its mailboxes: any other local part is refused at RCPT.

Accepted, a message to a made-up mailbox bounces later to whatever MAIL FROM
the client gave (backscatter); refused at RCPT, the client hears it and the
relay sends nothing. One `kurrier up` on real sockets, its next hop a sink.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

from tests.ingress.conftest import fresh_ip
from tests.ingress.smtp_probe import SmtpProbe
from tests.support.processes import wait_until
from tests.support.relay import UpRelay, documents, inbound_domain, message_records, route
from tests.support.sink import Sink

FORGED = "victim@outside.test"  # a sender the client never proved to be


def _config(sink: Sink, recipients: list[str]) -> str:
    return documents(inbound_domain("in.test", recipients), route("all", ["*"], sink.port))


def test_unknown_mailboxes_are_refused_at_rcpt_and_nothing_bounces(
    tmp_path: Path, sink: Sink
) -> None:
    with UpRelay(tmp_path, _config(sink, ["user"])) as relay:
        marker = uuid.uuid4().hex
        with SmtpProbe(relay.smtp_port, fresh_ip()) as smtp:
            assert smtp.reply().code == 220
            smtp.command("EHLO probe.test")
            assert smtp.command(f"MAIL FROM:<{FORGED}>").startswith("250")
            refused = smtp.command("RCPT TO:<nobody@in.test>")
            assert refused.startswith("550 5.1.1"), refused.text
            assert smtp.command("RCPT TO:<User@in.test>").startswith("250 2.1.5")
            assert smtp.command("RCPT TO:<postmaster@in.test>").startswith("250 2.1.5")
            assert smtp.command("DATA").code == 354
            smtp.send(f"Subject: {marker}\r\n\r\nhello\r\n.\r\n".encode())
            reply = smtp.reply()
            assert reply.startswith("250 2.0.0"), reply.text
        queue_id = reply.lines[-1].rsplit(" ", 1)[1]
        # Every delivery of it done (its record gone): one message, for the two taken.
        wait_until(
            lambda: queue_id not in {r.queue_id for r in message_records(relay.nats_url)},
            60,
            "the message to be delivered completely",
        )
        [delivered] = [m for m in sink.messages if marker.encode() in m.content]
        assert sorted(delivered.recipients) == ["User@in.test", "postmaster@in.test"]
        assert not [m for m in sink.messages if FORGED in m.recipients]  # no notification

        # The list is the table's: a mailbox added is taken with the next one.
        revision = relay.table_revision_in_use("ingress")
        relay.config.write_text(_config(sink, ["user", "nobody"]))
        assert relay.process is not None
        relay.process.send_signal(signal.SIGHUP)
        wait_until(
            lambda: relay.table_revision_in_use("ingress") > revision, 30, "ingress's new table"
        )
        with SmtpProbe(relay.smtp_port, fresh_ip()) as smtp:
            assert smtp.reply().code == 220
            smtp.command("EHLO probe.test")
            assert smtp.command(f"MAIL FROM:<{FORGED}>").startswith("250")
            assert smtp.command("RCPT TO:<nobody@in.test>").startswith("250 2.1.5")
