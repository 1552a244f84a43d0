"""A message sent while NATS is out of reach is recorded afterwards, not sent again.

Delivery has sent the message when it removes the record (or reports the
result) and acknowledges the job. If NATS is away at that moment, as it is
for seconds while a stream elects its leader after a node restart or a
healed partition, giving the job back would send the message again; the
worker keeps the job and tries the recording again instead. Here delivery
reaches NATS through a proxy the test cuts exactly then.
"""

from __future__ import annotations

import smtplib
import threading
from pathlib import Path

from tests.support.nats import NatsServer
from tests.support.processes import wait_until
from tests.support.relay import ServiceRelay, documents, route, trusting, wait_until_drained
from tests.support.sink import Sink
from tests.support.tcp_proxy import TcpProxy

RECORDING_FAILED = ("could not record the attempt", "delivery attempt failed")


def test_a_message_sent_during_a_nats_outage_is_not_sent_again(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    gate = threading.Event()
    with Sink() as sink, TcpProxy(nats_server.port) as proxy:
        sink.behaviour.data_gate = gate
        relay = ServiceRelay(
            tmp_path,
            nats_server.url,
            service_args={"delivery": ["--nats-url", f"nats://127.0.0.1:{proxy.port}"]},
        )
        relay.publish(documents(route("r", ["example.com"], sink.port), trusting("127.0.0.0/8")))
        with relay:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as smtp:
                smtp.sendmail("a@client.test", ["r@example.com"], b"Subject: once\r\n\r\nhi\r\n")
            wait_until(lambda: sink.transactions_held == 1, 60, "delivery to send DATA")
            proxy.stop()  # delivery loses NATS while the next hop holds the message
            gate.set()
            sink.wait_for(1, timeout=30)
            log = tmp_path / "delivery.log"
            wait_until(
                lambda: any(t in log.read_text(errors="replace") for t in RECORDING_FAILED),
                30,
                "delivery to fail recording the attempt",
            )
            proxy.start()
            wait_until_drained(nats_server.url, 90, "the message to finish")
            assert [m.content.count(b"Subject: once") for m in sink.messages] == [1]
