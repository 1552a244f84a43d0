"""kurrier's telemetry in the backends operators run: a real Prometheus scraping every
process of one `kurrier up`, and a real Jaeger as its OTLP endpoint.

One relay serves every test of the module (they only read): it has refused to
relay one, delivered a message, deferred one once and then delivered it, and
bounced one, so every panel of the dashboard has data. Prometheus is Debian's, with the chart's
alert rules loaded; Jaeger is built from its Go module by scripts/testbin.sh.
"""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from cryptography import x509
from kurrier.core.jetstream import dispatch_subject

from tests.support.certs import TestCA
from tests.support.chart import CHART
from tests.support.jaeger import Jaeger, JaegerSpan
from tests.support.processes import free_ports, kurrier_argv, wait_until
from tests.support.prometheus import Prometheus
from tests.support.relay import UpRelay, documents, inbound_domain, route
from tests.support.sink import Sink

DASHBOARD = CHART / "dashboards" / "kurrier.json"
RULES = CHART / "alerts" / "kurrier.rules.yaml"
SENDER = "sender@client.test"
# What Grafana puts in for the dashboard's variables: every namespace and route,
# and a rate window that spans the whole (short) test.
DASHBOARD_VARIABLES = {"$namespace": ".*", "$route": ".*", "$__rate_interval": "1m"}


@dataclass(frozen=True)
class Observed:
    relay: UpRelay
    prometheus: Prometheus
    jaeger: Jaeger
    deferred_once: str  # the queue id of the message deferred once, then delivered
    certificate_expiry: float


def _send(smtp: smtplib.SMTP, to: str, marker: str) -> str:
    """Send one message on an open session; returns its queue id from the 250 reply."""
    smtp.mail(SENDER)
    code, reply = smtp.rcpt(to)
    assert code == 250, reply
    code, reply = smtp.data(
        f"From: {SENDER}\r\nTo: {to}\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@client.test>\r\n\r\nHello.\r\n".encode()
    )
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    workdir = tmp_path_factory.mktemp("backends")
    # Ingress serves TLS, so the certificate expiry metric and its alert have data.
    cert, key = TestCA(workdir / "tls").issue("relay.test")
    expiry = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()
    with Sink() as sink, Jaeger(workdir) as jaeger:
        # client.test is one of the relay's domains, so the bounce goes back to the
        # (unauthenticated) sender, through the sink.
        config = documents(
            inbound_domain("example.com"),
            inbound_domain("client.test"),
            route("to-sink", ["*"], sink.port),
        )
        tls = ("--tls-cert", str(cert), "--tls-key", str(key))
        metrics = ("--metrics-base-port", str(free_ports(3)))
        with (
            UpRelay(workdir, config, *tls, *metrics, env=jaeger.env()) as relay,
            Prometheus(workdir, sorted(_targets(relay)), [RULES]) as prometheus,
        ):
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
                smtp.ehlo()
                _send(smtp, "rcpt@example.com", "delivered")
                smtp.mail(SENDER)
                assert smtp.rcpt("victim@elsewhere.test")[0] == 554  # relaying denied
                smtp.rset()
                sink.wait_for(1)
                sink.behaviour.temp_failures = 1  # one 451, then the retry is taken
                deferred_once = _send(smtp, "rcpt@example.com", "deferred-once")
                sink.wait_for(2)
                sink.behaviour.rejected = {"nobody@example.com": "550 5.1.1 no such user"}
                _send(smtp, "nobody@example.com", "bounced")
                sink.wait_for(3)  # the bounce, to the sender
            yield Observed(relay, prometheus, jaeger, deferred_once, expiry)


def _targets(relay: UpRelay) -> set[str]:
    """Where up's children serve /metrics, as state.json lists them."""
    addresses = relay.state["metrics"]
    assert isinstance(addresses, dict)
    return {str(address) for address in addresses.values()}


def _with_series(prometheus: Prometheus, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
    """The series expr returns once it returns any (Prometheus scrapes every second)."""
    found: list[dict[str, Any]] = []

    def returns_series() -> bool:
        found[:] = prometheus.query(expr)
        return bool(found)

    wait_until(returns_series, timeout, f"series from {expr}")
    return found


def test_prometheus_scrapes_every_child_of_up(observed: Observed) -> None:
    wait_until(
        lambda: (
            {t["metric"]["instance"] for t in observed.prometheus.query("up == 1")}
            == _targets(observed.relay)
        ),
        30,
        "every child of up scraped",
    )
    # Each child's own counts, summed over them, as the dashboard does.
    _with_series(observed.prometheus, "sum(kurrier_messages_received_total) == 3")
    _with_series(observed.prometheus, "sum(kurrier_recipients_deferred_total) == 1")
    [expiry] = _with_series(observed.prometheus, "kurrier_tls_certificate_expiry_timestamp_seconds")
    assert float(expiry["value"][1]) == observed.certificate_expiry


def test_every_dashboard_query_returns_series(observed: Observed) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    for expr in exprs:
        for variable, value in DASHBOARD_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        _with_series(observed.prometheus, expr)
    # The variables' label_values(metric, label) are Grafana's: their metrics must exist.
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            [metric] = re.findall(r"label_values\((\w+),", variable["definition"])
            _with_series(observed.prometheus, metric)


def _alerts() -> dict[str, str]:
    rules = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}


def test_prometheus_evaluates_every_alert_rule_on_live_series(observed: Observed) -> None:
    alerts = _alerts()
    # Prometheus loaded the rule file and evaluates every rule without an error.
    wait_until(
        lambda: (
            {
                rule["name"]: rule["health"]
                for group in observed.prometheus.api("rules")["groups"]
                for rule in group["rules"]
            }
            == dict.fromkeys(alerts, "ok")
        ),
        30,
        "every rule evaluated, healthy",
    )
    for name, expr in alerts.items():
        # Each rule compares one aggregation with its threshold; with `bool` the
        # comparison keeps every series, so the aggregation's own series show.
        comparison = re.compile(r" (>|<|==|!=|>=|<=) ")
        assert len(comparison.findall(expr)) == 1, (name, expr)
        _with_series(observed.prometheus, comparison.sub(r" \1 bool ", expr))
    # The test certificate expires in two days: that alert is on its way.
    wait_until(
        lambda: any(
            alert["labels"]["alertname"] == "KurrierCertificateExpiring"
            and alert["state"] == "pending"
            for alert in observed.prometheus.api("alerts")["alerts"]
        ),
        30,
        "the certificate alert to be pending",
    )


def _trace_done(spans: list[JaegerSpan]) -> bool:
    names = [s.name for s in spans]
    return (
        names.count("SMTP send") == 2
        and names.count("process kurrier.dispatch") == 2
        and names.count("process kurrier.result") == 1
        and "SMTP DATA" in names
    )


def _trace(observed: Observed, queue_id: str) -> list[JaegerSpan]:
    """The message's one trace in Jaeger, once it holds both attempts."""
    traces: list[list[JaegerSpan]] = []

    def found() -> bool:
        traces[:] = observed.jaeger.traces("kurrier-ingress", **{"kurrier.queue_id": queue_id})
        return len(traces) == 1 and _trace_done(traces[0])

    wait_until(found, 30, f"the trace of {queue_id} in Jaeger")
    return traces[0]


def test_jaeger_holds_the_deferred_message_as_one_trace_with_both_attempts(
    observed: Observed,
) -> None:
    queue_id = observed.deferred_once
    spans = _trace(observed, queue_id)
    by_id = {s.span_id: s for s in spans}
    [root] = [s for s in spans if s.parent_id is None]
    assert (root.name, root.service) == ("SMTP DATA", "kurrier-ingress")
    assert all(s.parent_id in by_id for s in spans if s is not root), "a parent outside the trace"
    assert {s.service for s in spans} == {"kurrier-ingress", "kurrier-queue", "kurrier-delivery"}

    assert root.tags["kurrier.queue_id"] == queue_id
    assert root.tags["kurrier.message_id"] == "<deferred-once@client.test>"
    assert root.tags["kurrier.smtp.reply_code"] == 250
    assert root.tags["network.protocol.name"] == "smtp"
    assert root.tags["client.address"] == "127.0.0.1"
    assert "example.com" in str(root.tags["kurrier.recipient.domains"])
    [enqueue] = [s for s in spans if "EnqueueMessages" in s.name]
    assert (enqueue.service, enqueue.tags["kurrier.queue_id"]) == ("kurrier-queue", queue_id)

    # Both attempts: a job each, published by the queue, taken by delivery.
    jobs = sorted(
        (s for s in spans if s.name == "send kurrier.dispatch"),
        key=lambda s: s.tags["kurrier.attempt"],
    )
    assert [(j.service, j.tags["kurrier.attempt"]) for j in jobs] == [
        ("kurrier-queue", 1),
        ("kurrier-queue", 2),
    ]
    for job in jobs:
        assert job.tags["messaging.system"] == "nats"
        assert job.tags["messaging.destination.name"] == dispatch_subject(queue_id)
        [taken] = [s for s in spans if s.parent_id == job.span_id]
        assert (taken.name, taken.service) == ("process kurrier.dispatch", "kurrier-delivery")
        assert taken.tags["kurrier.attempt"] == job.tags["kurrier.attempt"]
    sends = [s for s in spans if s.name == "SMTP send"]
    assert all(by_id[s.parent_id].name == "process kurrier.dispatch" for s in sends)  # type: ignore[index]
    replies = sorted(
        (s.tags["kurrier.smtp.reply_code"], s.tags["kurrier.smtp.enhanced_status"]) for s in sends
    )
    assert replies == [(250, "2.0.0"), (451, "4.3.0")]
    for send in sends:
        assert send.tags["kurrier.route"] == "to-sink"
        assert send.tags["server.address"] == "127.0.0.1"
    [deferred] = [s for s in sends if s.tags["kurrier.smtp.reply_code"] == 451]
    assert deferred.tags["kurrier.recipients.deferred"] == 1
    assert deferred.tags["otel.status_code"] == "ERROR"
    [result] = [s for s in spans if s.name == "process kurrier.result"]
    assert result.service == "kurrier-queue"


# The steps of a message deferred once and then delivered, as its history tells them.
DEFERRED_ONCE_STORY = [
    ("received",),
    ("queued",),
    ("dispatched", 1),
    ("attempt", 1, 451),
    ("deferred", 451),
    ("dispatched", 2),
    ("attempt", 2, 250),
    ("delivered", 250),
]


def _history(observed: Observed, queue_id: str) -> list[dict[str, Any]]:
    """`kurrier queue history ID --json` once it holds the whole story (each process
    publishes its events in batches of its own)."""
    events: list[dict[str, Any]] = []

    def complete() -> bool:
        result = subprocess.run(
            kurrier_argv(
                "queue", "history", queue_id, "--json", "--data-dir", str(observed.relay.data_dir)
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        events[:] = json.loads(result.stdout).get("events", [])
        return len(events) >= len(DEFERRED_ONCE_STORY)

    wait_until(complete, 30, f"the history of {queue_id}")
    return events


def _code(reply: str) -> int:
    return int(reply.split(" ", 1)[0])


def _history_story(events: list[dict[str, Any]]) -> list[tuple[object, ...]]:
    """Each event as a step: its name, the attempt it belongs to, the reply code."""
    story: list[tuple[object, ...]] = []
    for event in events:
        details = event["details"]
        step: tuple[object, ...] = (event["event"],)
        if "attempt" in details:
            step += (int(details["attempt"]),)
        if "reply" in details:
            step += (_code(details["reply"]),)
        story.append(step)
    return story


def _trace_story(spans: list[JaegerSpan]) -> list[tuple[object, ...]]:
    """The same steps read from the trace alone, in the order its spans and span
    events happened: SMTP DATA is the message received, the Enqueue span it
    queued, each `send kurrier.dispatch` a dispatch, each `SMTP send` an attempt of
    its job's dispatch, `process kurrier.result` the queue deferring what the
    attempt could not deliver, an outcome `delivered` on SMTP send a delivery."""
    by_id = {s.span_id: s for s in spans}
    timed: list[tuple[float, tuple[object, ...]]] = []
    deferred_codes: list[int] = []
    for span in spans:
        if span.name == "SMTP DATA":
            timed.append((span.start, ("received",)))
        elif "EnqueueMessages" in span.name:
            timed.append((span.start, ("queued",)))
        elif span.name == "send kurrier.dispatch":
            timed.append((span.start, ("dispatched", span.tags["kurrier.attempt"])))
        elif span.name == "SMTP send":
            job = by_id[span.parent_id]  # type: ignore[index]
            attempt = job.tags["kurrier.attempt"]
            timed.append((span.start, ("attempt", attempt, span.tags["kurrier.smtp.reply_code"])))
            for at, fields in span.events:
                code = fields["kurrier.smtp.reply_code"]
                if fields["kurrier.outcome"] == "delivered":
                    timed.append((at, ("delivered", code)))
                elif fields["kurrier.outcome"] == "deferred":
                    deferred_codes.append(code)
        elif span.name == "process kurrier.result":
            # The queue reads the deferral's reply from the result the attempt sent.
            timed.append((span.start, ("deferred",)))
    story = [step for _, step in sorted(timed, key=lambda pair: pair[0])]
    codes = iter(deferred_codes)
    return [(*step, next(codes)) if step == ("deferred",) else step for step in story]


def test_the_history_and_the_trace_tell_the_same_story(observed: Observed) -> None:
    """`kurrier queue history` of the message deferred once matches its trace in Jaeger
    event by event: the same message, the same attempts, replies and order."""
    queue_id = observed.deferred_once
    events = _history(observed, queue_id)
    spans = _trace(observed, queue_id)

    assert _history_story(events) == DEFERRED_ONCE_STORY
    assert _trace_story(spans) == DEFERRED_ONCE_STORY
    # One message, one trace: every event names the trace Jaeger holds it in.
    assert {e["queue_id"] for e in events} == {queue_id}
    assert {e["trace_id"] for e in events} == {s.trace_id for s in spans}
    assert {s.tags["kurrier.queue_id"] for s in spans if "kurrier.queue_id" in s.tags} == {queue_id}
    # Each attempt went to the next hop the span names, by the service that made it.
    sends = {s.tags["kurrier.attempt"]: s for s in spans if s.name == "process kurrier.dispatch"}
    for event in events:
        if event["event"] == "attempt":
            details = event["details"]
            [send] = [
                s
                for s in spans
                if s.name == "SMTP send" and s.parent_id == sends[int(details["attempt"])].span_id
            ]
            assert details["hop"] == f"{send.tags['server.address']}:{send.tags['server.port']}"
            assert (event["service"], send.service) == ("delivery", "kurrier-delivery")
