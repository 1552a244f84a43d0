"""`kurrier queue sites`: the traffic shaping of each destination site, read by the queue.

A real `kurrier up` (real NATS with each component's permissions, real
delivery, the queue's admin gRPC) sends to two real SMTP sinks: one holds
its transactions open (connections held now), one throttles with `421`
(slowed down).
"""

from __future__ import annotations

import json
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.processes import wait_until
from tests.support.relay import UpRelay, documents, route, trusting
from tests.support.sink import Sink


def _send(relay: UpRelay, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
        smtp.sendmail("s@senders.test", [recipient], b"Subject: sites\r\n\r\nHello.\r\n")


def _sites(relay: UpRelay) -> dict[str, dict[str, Any]]:
    result = relay.queue_admin("sites", "--json")
    assert result.returncode == 0, result.stderr
    return {site["name"]: site for site in json.loads(result.stdout).get("sites", [])}


def test_sites_show_connections_held_messages_and_slow_down(tmp_path: Path) -> None:
    gate = threading.Event()
    with Sink() as held, Sink() as throttling:
        held.behaviour.data_gate = gate
        throttling.behaviour.outage_phase = "greeting"
        throttling.behaviour.outage_reply = "421 4.7.0 too many connections, slow down"
        config = documents(
            route(
                "held",
                ["held.test"],
                held.port,
                shaping="{maxConnections: 3, messagesPerMinute: 100}",
            ),
            route(
                "throttling",
                ["throttling.test"],
                throttling.port,
                shaping="{maxConnections: 4, messagesPerMinute: 1000}",
            ),
            trusting("127.0.0.0/8"),
        )
        # The throttled message is not tried again while the counts are read: each
        # attempt takes another message of the site's minute.
        not_again = ("--min-backoff", "10m", "--max-backoff", "10m")
        with UpRelay(tmp_path, config, *not_again) as relay:
            # The gate opens before `up` stops, which waits for its transactions in flight.
            try:
                started = time.time()
                _send(relay, "a@held.test")
                _send(relay, "b@held.test")
                _send(relay, "c@throttling.test")
                wait_until(lambda: held.transactions_held >= 2, 30, "two transactions held")
                wait_until(lambda: throttling.outage_replies >= 1, 30, "the site to throttle")
                held_site, throttled_site = f"127.0.0.1:{held.port}", f"127.0.0.1:{throttling.port}"

                def shown() -> bool:
                    sites = _sites(relay)
                    return held_site in sites and "slowed_since" in sites.get(throttled_site, {})

                wait_until(shown, 30, "both sites in `kurrier queue sites`")
                sites = _sites(relay)
                # Proto3 JSON leaves out zeros: no slow-down, no connection.
                assert sites[held_site] == {
                    "name": held_site,
                    "max_connections": 3,
                    "messages_per_minute": 100,
                    "allowed_connections": 3,
                    "allowed_messages_per_minute": 100,
                    "connections": 2,
                    "messages_last_minute": 2,
                }
                throttled = sites[throttled_site]
                # Halved by the 421; the attempt took a message of the minute, and its
                # connection, closed, holds no slot.
                assert {
                    key: value for key, value in throttled.items() if key != "slowed_since"
                } == {
                    "name": throttled_site,
                    "max_connections": 4,
                    "messages_per_minute": 1000,
                    "allowed_connections": 2,
                    "allowed_messages_per_minute": 500,
                    "messages_last_minute": 1,
                }
                assert started <= throttled["slowed_since"] <= time.time()

                text = relay.queue_admin("sites")
                assert text.returncode == 0, text.stderr
                rows = {line.split()[0]: line.split() for line in text.stdout.splitlines()}
                assert rows[held_site] == [held_site, "2/3", "2/100", "-"]
                assert rows[throttled_site][:6] == [
                    throttled_site,
                    "0/2",
                    "(4)",
                    "1/500",
                    "(1000)",
                    "since",
                ]
            finally:
                gate.set()
