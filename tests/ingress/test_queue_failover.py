"""A queue whose path silently drops everything is given up, and the next one takes the mail.

Ingress keeps one connection to the queue (pick_first over the queue
addresses). A path that loses every packet (a node gone, a partition) looks
healthy to TCP for many minutes; without keepalive pings, ingress would keep
answering 451 on that connection until the path healed. Here the path to the
first of two queues goes silent (a TcpProxy that drops every byte and keeps
the connections open) while the second stays reachable.
"""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

from tests.support.nats import NatsServer
from tests.support.processes import free_port, kurrier_argv, port_open, stop_process, wait_until
from tests.support.relay import ServiceRelay, documents, route, trusting
from tests.support.sink import Sink
from tests.support.tcp_proxy import TcpProxy


def _sent(smtp_port: int, subject: str) -> bool:
    """True on 250; False on the 451 of a queue that did not answer in time."""
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as client:
        try:
            client.sendmail(
                "a@client.test", ["r@example.com"], f"Subject: {subject}\r\n\r\nhi\r\n".encode()
            )
        except smtplib.SMTPDataError as error:
            if error.smtp_code != 451:
                raise
            return False
    return True


def test_ingress_leaves_a_silent_queue_for_the_next(
    tmp_path: Path, sink: Sink, nats_server: NatsServer
) -> None:
    relay = ServiceRelay(tmp_path, nats_server.url)
    relay.publish(documents(route("to-sink", ["example.com"], sink.port), trusting("127.0.0.0/8")))
    second_port = free_port()
    with (tmp_path / "queue-2.log").open("ab") as log:
        second = subprocess.Popen(
            kurrier_argv(
                "queue",
                *("--nats-url", nats_server.url, "--hostname", "relay.test"),
                *("--metrics-listen", "off", "--listen", f"127.0.0.1:{second_port}"),
            ),
            stdout=log,
            stderr=log,
        )
    try:
        wait_until(lambda: port_open(second_port), 60, "the second queue to listen")
        relay.start("queue")
        first_port = int(relay.queue_address.rsplit(":", 1)[1])
        with TcpProxy(first_port) as path:
            addresses = f"ipv4:127.0.0.1:{path.port},127.0.0.1:{second_port}"
            relay.service_args["ingress"] = ["--queue-address", addresses]
            relay.start("delivery")
            relay.start("ingress")
            try:
                assert _sent(relay.smtp_port, "before")
                assert path.open_connections == 1  # the first address is the one in use
                path.silence()
                # At most one message's 20 s deadline, then the keepalive's 15 s, and
                # a connection attempt to the silent address timing out (20 s).
                wait_until(
                    lambda: _sent(relay.smtp_port, "after"), 120, "the second queue to take mail"
                )
            finally:
                relay.__exit__()
        delivered = {m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in sink.wait_for(2)}
        assert {b"before", b"after"} <= delivered
    finally:
        stop_process(second)
