"""SIGTERM: new clients hear 421, idle sessions are closed, open transactions finish, then exit."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

from tests.ingress.smtp_probe import SmtpProbe
from tests.support.nats import NatsServer
from tests.support.relay import ServiceRelay, documents, inbound_domain, route
from tests.support.sink import Sink


def test_sigterm_drains_ingress(tmp_path: Path, nats_server: NatsServer, sink: Sink) -> None:
    relay = ServiceRelay(tmp_path, nats_server.url)
    relay.publish(documents(inbound_domain("example.com"), route("r", ["*"], sink.port)))
    marker = uuid.uuid4().hex
    with relay:
        ingress = relay.processes["ingress"]
        busy = SmtpProbe(relay.smtp_port, "127.0.0.3")
        idle = SmtpProbe(relay.smtp_port, "127.0.0.4")
        for smtp in (busy, idle):
            assert smtp.reply().code == 220
            smtp.command("EHLO probe.test")
        assert busy.command("MAIL FROM:<a@client.test>").code == 250
        assert busy.command("RCPT TO:<user@example.com>").code == 250

        ingress.send_signal(signal.SIGTERM)
        # The idle session is told at once and closed.
        assert idle.reply().startswith("421 4.3.2")
        assert idle.closed_by_server()
        # A new client is greeted with 421, not refused: it will try again elsewhere.
        with SmtpProbe(relay.smtp_port, "127.0.0.5") as late:
            assert late.reply().startswith("421 4.3.2")
            assert late.closed_by_server()
        # The open transaction finishes and is accepted; then that session is closed too.
        assert busy.command("DATA").code == 354
        busy.send(f"Subject: {marker}\r\n\r\nlast words\r\n.\r\n".encode())
        assert busy.reply().startswith("250 2.0.0")
        assert busy.reply().startswith("421 4.3.2")
        assert busy.closed_by_server()
        assert ingress.wait(timeout=30) == 0
        [delivered] = sink.wait_for(1)
        assert marker.encode() in delivered.content
