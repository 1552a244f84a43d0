"""One trace per message, end to end: real services exporting to a real OTLP receiver.

Each test runs ingress, queue and delivery as separate processes on a real
nats-server, sends mail over SMTP to a real sink, and reads back the spans
the services exported (OTLP over gRPC, or over HTTP where a test says so).
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.nats import NatsServer
from tests.support.otlp_receiver import CollectedSpan, OtlpReceiver
from tests.support.relay import ServiceRelay, documents, inbound_domain, route
from tests.support.sink import Sink

SENDER = "sender@client.test"
RECIPIENT = "rcpt@example.com"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def _config(sink: Sink) -> str:
    # client.test is routed too, and one of the relay's domains (bounceUnauthenticated),
    # so bounces to the sender arrive at the sink.
    return documents(
        inbound_domain("example.com"),
        inbound_domain("client.test"),
        route("to-sink", ["*"], sink.port),
    )


def _message(marker: str, extra_headers: str = "") -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@client.test>\r\n{extra_headers}\r\nHello.\r\n"
    ).encode()


def _send(relay: ServiceRelay, marker: str, to: str = RECIPIENT, extra_headers: str = "") -> str:
    """Send one message; returns its queue id from the 250 reply."""
    relay.wait_for_table()
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail(SENDER)
        code, reply = smtp.rcpt(to)
        assert code == 250, reply
        code, reply = smtp.data(_message(marker, extra_headers))
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def _named(spans: list[CollectedSpan], name: str, queue_id: str) -> list[CollectedSpan]:
    return [s for s in spans if s.name == name and s.queue_id == queue_id]


def _finished(
    spans: list[CollectedSpan], queue_id: str, attempts: int = 1, received: bool = True
) -> bool:
    """Whether each service has exported every span it makes about the message.

    Every attempt but the last (which delivered, and finished the message in
    delivery) sent its result to the queue. Each service exports its spans in
    batches, so each of its spans is waited for, not only its last.
    """
    enqueued = [s for s in spans if "EnqueueMessages" in s.name and s.queue_id == queue_id]
    return (
        len(_named(spans, "process kurrier.result", queue_id)) == attempts - 1
        and len(_named(spans, "send kurrier.dispatch", queue_id)) == attempts
        and len(_named(spans, "process kurrier.dispatch", queue_id)) == attempts
        and (not received or (bool(_named(spans, "SMTP DATA", queue_id)) and bool(enqueued)))
    )


def _one_trace(spans: list[CollectedSpan], queue_id: str) -> list[CollectedSpan]:
    """All spans of the one trace the message's spans are in (and prove there is one)."""
    trace_ids = {s.trace_id for s in spans if s.queue_id == queue_id}
    assert len(trace_ids) == 1, f"{queue_id} is in {len(trace_ids)} traces"
    [trace_id] = trace_ids
    return [s for s in spans if s.trace_id == trace_id]


def _the(spans: list[CollectedSpan], service: str, name: str, **attributes: Any) -> CollectedSpan:
    found = [
        s
        for s in spans
        if s.service == service
        and name in s.name
        and all(s.attributes.get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, f"{len(found)} spans {service}/{name} {attributes}"
    return found[0]


def _all_text(span: CollectedSpan) -> str:
    return json.dumps([span.attributes, span.events], default=str)


def _running(tmp_path: Path, nats: NatsServer, sink: Sink, env: dict[str, str]) -> ServiceRelay:
    relay = ServiceRelay(tmp_path, nats.url, env=env)
    relay.publish(_config(sink))
    return relay


def test_one_message_is_one_trace_through_ingress_queue_and_delivery(
    tmp_path: Path, sink: Sink, nats_server: NatsServer, receiver: OtlpReceiver
) -> None:
    # A Traceparent header in the message is not trusted unless asked for.
    foreign = "00-0123456789abcdef0123456789abcdef-0123456789abcdef-01"
    with _running(tmp_path, nats_server, sink, receiver.env()) as relay:
        queue_id = _send(relay, "traced", extra_headers=f"Traceparent: {foreign}\r\n")
        sink.wait_for(1)
        spans = receiver.wait_until(lambda s: _finished(s, queue_id), "the message's spans")
    trace = _one_trace(spans, queue_id)
    roots = [s for s in trace if not s.parent_span_id]
    assert [(r.service, r.name, r.kind) for r in roots] == [
        ("kurrier-ingress", "SMTP DATA", "server")
    ]
    [root] = roots
    assert root.trace_id != foreign.split("-")[1]
    assert root.attributes["kurrier.message_id"] == "<traced@client.test>"
    assert root.attributes["kurrier.smtp.reply_code"] == 250
    assert root.attributes["client.address"] == "127.0.0.1"
    assert root.attributes["kurrier.recipient.domains"] == ["example.com"]

    enqueue = _the(trace, "kurrier-queue", "QueueService/EnqueueMessages")
    sent_job = _the(trace, "kurrier-queue", "send kurrier.dispatch", **{"kurrier.attempt": 1})
    job = _the(trace, "kurrier-delivery", "process kurrier.dispatch")
    smtp = _the(trace, "kurrier-delivery", "SMTP send")
    assert enqueue.kind == "server" and enqueue.parent_span_id == root.span_id
    assert enqueue.attributes["kurrier.queue_id"] == queue_id
    assert sent_job.kind == "producer" and sent_job.parent_span_id == enqueue.span_id
    assert job.kind == "consumer" and job.parent_span_id == sent_job.span_id
    assert job.attributes["kurrier.attempt"] == 1
    assert smtp.kind == "client" and smtp.parent_span_id == job.span_id
    assert smtp.attributes["kurrier.route"] == "to-sink"
    assert smtp.attributes["server.port"] == sink.port
    assert smtp.attributes["kurrier.smtp.reply_code"] == 250
    # Delivered in full by its one job: delivery removed it, no result went to the queue.
    assert len(trace) == 5, sorted((s.service, s.name) for s in trace)

    # No mail addresses anywhere unless KURRIER_TRACE_ADDRESSES is on.
    for span in trace:
        assert SENDER not in _all_text(span) and RECIPIENT not in _all_text(span), span

    # Every log line about the message names its queue id and the trace it is in.
    lines = [
        json.loads(line)
        for name in ("ingress", "queue", "delivery")
        for line in (tmp_path / f"{name}.log").read_text().splitlines()
        if line.startswith("{")
    ]
    about = [line for line in lines if line.get("queue_id") == queue_id]
    assert {line["service"] for line in about} >= {"kurrier-queue"}
    assert {line.get("trace_id") for line in about} == {root.trace_id}
    assert all(line.get("span_id") for line in about)


def test_a_deferred_then_delivered_message_shows_both_attempts_in_one_trace(
    tmp_path: Path, sink: Sink, nats_server: NatsServer, receiver: OtlpReceiver
) -> None:
    sink.behaviour.temp_failures = 1
    with _running(tmp_path, nats_server, sink, receiver.env()) as relay:
        queue_id = _send(relay, "deferred")
        sink.wait_for(1)
        spans = receiver.wait_until(
            lambda s: _finished(s, queue_id, attempts=2), "both attempts' spans"
        )
    trace = _one_trace(spans, queue_id)
    enqueue = _the(trace, "kurrier-queue", "QueueService/EnqueueMessages")
    for attempt, reply_code in ((1, 451), (2, 250)):
        sent = _the(trace, "kurrier-queue", "send kurrier.dispatch", **{"kurrier.attempt": attempt})
        # The retry was dispatched from the queue's own schedule, long after the
        # Enqueue call: it joins the trace through the record's traceparent.
        assert sent.parent_span_id == enqueue.span_id
        job = _the(
            trace, "kurrier-delivery", "process kurrier.dispatch", **{"kurrier.attempt": attempt}
        )
        assert job.parent_span_id == sent.span_id
        [smtp] = [s for s in trace if s.name == "SMTP send" and s.parent_span_id == job.span_id]
        assert smtp.attributes["kurrier.smtp.reply_code"] == reply_code
        assert smtp.error == (reply_code >= 400)
        outcome = "deferred" if attempt == 1 else "delivered"
        assert smtp.attributes[f"kurrier.recipients.{outcome}"] == 1
        # The deferral went to the queue; the delivery finished the message in delivery.
        results = [
            s for s in trace if s.name == "send kurrier.result" and s.parent_span_id == job.span_id
        ]
        assert len(results) == (1 if attempt == 1 else 0)


def test_a_bounce_appears_in_the_failed_message_trace(
    tmp_path: Path, sink: Sink, nats_server: NatsServer, receiver: OtlpReceiver
) -> None:
    sink.behaviour.rejected = {"nobody@example.com": "550 5.1.1 no such user"}
    with _running(tmp_path, nats_server, sink, receiver.env()) as relay:
        queue_id = _send(relay, "bounced", to="nobody@example.com")
        [notice] = sink.wait_for(1)
        assert notice.recipients == (SENDER,)
        spans = receiver.wait_until(
            lambda s: any(
                _finished(s, str(b.queue_id), received=False)
                for b in s
                if b.name == "bounce" and b.attributes["kurrier.dsn.original_queue_id"] == queue_id
            ),
            "the bounce's delivery",
        )
    trace = _one_trace(spans, queue_id)
    bounce = _the(trace, "kurrier-queue", "bounce")
    notice_id = str(bounce.queue_id)
    assert bounce.attributes["kurrier.dsn.original_queue_id"] == queue_id
    assert _one_trace(spans, notice_id) == trace
    enqueue = _the(trace, "kurrier-queue", "QueueService/EnqueueMessages")
    assert bounce.parent_span_id == enqueue.span_id
    failed = _the(trace, "kurrier-delivery", "SMTP send", **{"kurrier.smtp.reply_code": 550})
    assert failed.error and failed.attributes["kurrier.smtp.enhanced_status"] == "5.1.1"
    notice_job = _the(
        trace, "kurrier-queue", "send kurrier.dispatch", **{"kurrier.queue_id": notice_id}
    )
    assert notice_job.parent_span_id == bounce.span_id
    _the(trace, "kurrier-delivery", "SMTP send", **{"kurrier.smtp.reply_code": 250})


def test_a_trusted_traceparent_header_continues_the_senders_trace_over_otlp_http(
    tmp_path: Path, sink: Sink, nats_server: NatsServer, receiver: OtlpReceiver
) -> None:
    app_trace, app_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    env = {
        **receiver.env("http/protobuf"),
        "KURRIER_TRUST_TRACEPARENT_HEADER": "true",
        "KURRIER_TRACE_ADDRESSES": "true",
    }
    with _running(tmp_path, nats_server, sink, env) as relay:
        queue_id = _send(
            relay, "from-app", extra_headers=f"traceparent: 00-{app_trace}-{app_span}-01\r\n"
        )
        sink.wait_for(1)
        spans = receiver.wait_until(lambda s: _finished(s, queue_id), "the message's spans")
    trace = _one_trace(spans, queue_id)
    root = _the(trace, "kurrier-ingress", "SMTP DATA")
    assert (root.trace_id, root.parent_span_id) == (app_trace, app_span)
    # Addresses were asked for: the envelope and each recipient's reply are in the trace.
    assert root.attributes["kurrier.mail_from"] == SENDER
    assert root.attributes["kurrier.recipients"] == [RECIPIENT]
    smtp = _the(trace, "kurrier-delivery", "SMTP send")
    [(event, attributes)] = smtp.events
    assert event == "recipient" and attributes["kurrier.recipient"] == RECIPIENT
    assert str(attributes["kurrier.smtp.reply"]).startswith("250")
    assert {s.service for s in trace} == {"kurrier-ingress", "kurrier-queue", "kurrier-delivery"}


PUBLISHER = """
import asyncio, sys
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.core.routing import RoutingTable
from kurrier.core.table_store import publish_table
from kurrier.core.telemetry import setup_telemetry

async def main() -> None:
    nc = await connect(sys.argv[1], "test-operator")
    await ensure_layout(nc.jetstream())
    await publish_table(nc.jetstream(), RoutingTable())
    await disconnect(nc)

setup_telemetry("kurrier-operator")
asyncio.run(main())
"""


def test_each_routing_table_publish_is_a_span_of_the_operator(
    nats_server: NatsServer, receiver: OtlpReceiver
) -> None:
    # What the operator does after each compile, in a process set up as `kurrier operator` is.
    done = subprocess.run(
        [sys.executable, "-c", PUBLISHER, nats_server.url],
        env={**os.environ, **receiver.env()},
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    [span] = receiver.wait_until(lambda s: len(s) == 1, "the publish span")
    assert (span.service, span.name, span.kind) == (
        "kurrier-operator",
        "publish routing table",
        "producer",
    )
    assert span.attributes["kurrier.table.revision"] == 1
    assert span.attributes["messaging.destination.name"] == "kurrier-config"
