"""Each service's Prometheus endpoint, scraped while mail flows through real processes."""

from __future__ import annotations

import smtplib
import urllib.request
from pathlib import Path

import pytest

from tests.support.metrics import value
from tests.support.nats import NatsServer
from tests.support.processes import wait_until
from tests.support.relay import ServiceRelay, documents, inbound_domain, route
from tests.support.sink import Sink

SENDER = "sender@client.test"


def _send(smtp: smtplib.SMTP, to: str, subject: str) -> None:
    smtp.sendmail(SENDER, [to], f"Subject: {subject}\r\n\r\nHello.\r\n".encode())


@pytest.fixture
def relay(tmp_path: Path, sink: Sink, nats_server: NatsServer) -> ServiceRelay:
    # As the chart runs the services without a collector: the SDK off, /metrics still served.
    relay = ServiceRelay(tmp_path, nats_server.url, env={"OTEL_SDK_DISABLED": "true"}, metrics=True)
    # No trusted network: only mail for example.com is accepted; bounces go to the sink
    # too, client.test being one of the relay's domains (bounceUnauthenticated).
    relay.publish(
        documents(
            inbound_domain("example.com"),
            inbound_domain("client.test"),
            route("to-sink", ["example.com", "client.test"], sink.port),
        )
    )
    return relay


def test_counters_gauges_and_histograms_move_as_mail_flows(relay: ServiceRelay, sink: Sink) -> None:
    with relay:
        relay.wait_for_table()
        ingress, queue, delivery = (
            relay.metrics_ports[n] for n in ("ingress", "queue", "delivery")
        )
        assert value(ingress, "kurrier_messages_received_total") == 0
        assert value(ingress, "kurrier_smtp_sessions") == 0

        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
            wait_until(lambda: value(ingress, "kurrier_smtp_sessions") == 1, 10, "one open session")
            _send(smtp, "rcpt@example.com", "delivered")
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                _send(smtp, "victim@elsewhere.test", "relay attempt")
            sink.wait_for(1)

            # A next hop that keeps answering 451: the message waits, deferred.
            sink.behaviour.temp_failures = 1_000_000
            _send(smtp, "rcpt@example.com", "deferred")
            wait_until(
                lambda: value(queue, "kurrier_queue_messages", state="deferred") == 1,
                30,
                "a deferred message in the queue depth",
            )
            assert value(queue, "kurrier_recipients_deferred_total") >= 1
            wait_until(
                lambda: (
                    value(queue, "kurrier_queue_oldest_message_age_seconds", state="deferred") > 0.5
                ),
                10,
                "the deferred message to age",
            )
            sink.behaviour.temp_failures = 0
            sink.wait_for(2)

            sink.behaviour.rejected = {"nobody@example.com": "550 5.1.1 no such user"}
            _send(smtp, "nobody@example.com", "bounced")
            sink.wait_for(3)  # the bounce, to the sender
        wait_until(lambda: value(ingress, "kurrier_smtp_sessions") == 0, 10, "the session closed")

        assert value(ingress, "kurrier_messages_received_total") == 3
        assert value(ingress, "kurrier_messages_rejected_total", code="554", reason="5.7.1") == 1

        # Delivery counts what it finished itself (each message's delivering
        # attempt here), the queue what it learnt from results (the bounce).
        wait_until(
            lambda: value(delivery, "kurrier_recipients_delivered_total") == 3,
            30,
            "both messages and the bounce delivered",
        )
        assert value(queue, "kurrier_recipients_delivered_total") == 0
        assert value(queue, "kurrier_messages_queued_total") == 4  # the bounce included
        assert value(queue, "kurrier_recipients_bounced_total", reason="rejected") == 1
        assert value(delivery, "kurrier_queue_time_seconds_count", outcome="delivered") == 3
        assert value(queue, "kurrier_queue_time_seconds_count") == 1
        assert value(queue, "kurrier_queue_time_seconds_count", outcome="bounced") == 1
        wait_until(lambda: value(queue, "kurrier_queue_messages") == 0, 10, "the queue to be empty")
        assert value(queue, "kurrier_queue_oldest_message_age_seconds") == 0

        by_route = {"route": "to-sink"}
        assert (
            value(
                delivery,
                "kurrier_delivery_attempts_total",
                **by_route,
                domain="example.com",
                outcome="delivered",
                status="2.0.0",
            )
            == 2
        )
        assert (
            value(
                delivery,
                "kurrier_delivery_attempts_total",
                **by_route,
                outcome="deferred",
                status="4.3.0",
            )
            >= 1
        )
        assert (
            value(
                delivery,
                "kurrier_delivery_attempts_total",
                **by_route,
                outcome="bounced",
                status="5.1.1",
            )
            == 1
        )
        assert (
            value(
                delivery,
                "kurrier_delivery_attempts_total",
                **by_route,
                domain="client.test",
                outcome="delivered",
            )
            == 1
        )
        assert value(delivery, "kurrier_delivery_duration_seconds_count", **by_route) >= 4

        for port in (ingress, queue, delivery):
            assert value(port, "kurrier_nats_connected") == 1
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as ok:
                assert ok.status == 200
