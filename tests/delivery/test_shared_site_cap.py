"""Three delivery processes share one destination site's connection cap (spec.shaping).

Real processes (queue, ingress, three deliveries) on a real nats-server; the
next hop is a sink that counts the connections open at once. Each delivery
process may open two connections to the site by itself (maxConnections) and
takes two jobs at a time, so the jobs spread over all three: counted per
process the site would see six connections.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

from tests.support.metrics import value
from tests.support.nats import NatsServer
from tests.support.relay import ServiceRelay, documents, route, trusting
from tests.support.sink import Sink

MESSAGES = 12


def test_three_delivery_processes_share_a_sites_connection_cap(
    tmp_path: Path, nats_server: NatsServer, sink: Sink
) -> None:
    # Each transaction takes a while, so every process has work in flight at once.
    sink.behaviour.data_delay = 0.3
    relay = ServiceRelay(
        tmp_path,
        nats_server.url,
        deliveries=3,
        metrics=True,
        service_args={"delivery": ["--concurrency", "2"]},
    )
    relay.publish(
        documents(
            route(
                "capped",
                ["example.com"],
                sink.port,
                maxConnections="2",
                shaping="{maxConnections: 2}",
            ),
            trusting("127.0.0.0/8"),
        )
    )
    with relay, smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=30) as client:
        for number in range(MESSAGES):
            client.sendmail("a@client.test", ["r@example.com"], f"Subject: m{number}\r\n\r\nx\r\n")
        sink.wait_for(MESSAGES, timeout=90)
        # Each process shows the site's cap it works under.
        site = f"127.0.0.1:{sink.port}"
        for name in ("delivery", "delivery-2", "delivery-3"):
            port = relay.metrics_ports[name]
            assert value(port, "kurrier_delivery_site_connection_limit", site=site) == 2
    assert sink.max_connections_open == 2
