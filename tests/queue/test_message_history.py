"""`kurrier queue history`: every event of a message, delivered or not, read back in order.

One real `kurrier up` (real NATS, real SMTP sinks, a real OTLP receiver so
the messages have traces) serves the module's tests; each test sends its
own messages, to addresses of its own.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.otlp_receiver import OtlpReceiver
from tests.support.processes import free_port, kurrier_argv, wait_until
from tests.support.relay import UpRelay, documents, route, trusting
from tests.support.sink import Sink

SENDER = "s@senders.test"
MISSING_AUTH = "{secretRef: {name: missing}}"


@dataclass
class Relay:
    up: UpRelay
    sink: Sink
    bounce_sink: Sink
    traces: OtlpReceiver


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    with Sink() as sink, Sink() as bounce_sink, OtlpReceiver() as traces:
        config = documents(
            route("to-sink", ["example.com"], sink.port),
            route("to-senders", ["senders.test"], bounce_sink.port),
            # Nothing listens there: mail for stuck.test stays deferred.
            route("nowhere", ["stuck.test"], free_port()),
            # Its credentials' Secret does not exist: no next hop is ever asked.
            route("unusable", ["broken.test"], free_port(), tls="required", auth=MISSING_AUTH),
            trusting("127.0.0.0/8"),
        )
        with UpRelay(tmp_path_factory.mktemp("history"), config, env=traces.env()) as up:
            yield Relay(up, sink, bounce_sink, traces)


def _send(relay: Relay, recipient: str, sender: str = SENDER) -> str:
    """One message; its queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", relay.up.smtp_port, timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail(sender)
        code, reply = smtp.rcpt(recipient)
        assert code == 250, reply
        code, reply = smtp.data(f"From: {sender}\r\nSubject: history\r\n\r\nHello.\r\n".encode())
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[-1]


def _admin(relay: Relay, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kurrier_argv("queue", *args, "--data-dir", str(relay.up.data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _history(relay: Relay, *args: str) -> list[dict[str, Any]]:
    result = _admin(relay, "history", "--json", *args)
    assert result.returncode == 0, result.stderr
    events: list[dict[str, Any]] = json.loads(result.stdout).get("events", [])
    return events


def _steps(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["service"], e["event"]) for e in events]


def _history_with(relay: Relay, queue_id: str, *steps: tuple[str, str]) -> list[dict[str, Any]]:
    """The message's history once it holds these steps, in whatever order: each
    process publishes its events in batches of its own, so one may come later."""
    found: list[dict[str, Any]] = []

    def complete() -> bool:
        found[:] = _history(relay, queue_id)
        return not Counter(steps) - Counter(_steps(found))

    wait_until(complete, 60, f"{queue_id}'s history to show {steps}")
    return found


def test_deferred_once_then_delivered_reads_in_order_in_one_trace(relay: Relay) -> None:
    relay.sink.behaviour.temp_failures = 1
    queue_id = _send(relay, "once@example.com")
    expected = [
        ("ingress", "received"),
        ("queue", "queued"),
        ("queue", "dispatched"),
        ("delivery", "attempt"),
        ("queue", "deferred"),
        ("queue", "dispatched"),
        ("delivery", "attempt"),
        ("delivery", "delivered"),
    ]
    events = _history_with(relay, queue_id, *expected)
    assert _steps(events) == expected
    received, queued, dispatched, first, deferred, redispatched, second, delivered = (
        e["details"] for e in events
    )
    # Each attempt names the dispatch whose job it ran, as its trace's job spans do.
    assert (dispatched["attempt"], first["attempt"]) == ("1", "1")
    assert (redispatched["attempt"], second["attempt"]) == ("2", "2")
    assert dispatched["recipients"] == redispatched["recipients"] == "once@example.com"
    assert received["client"] == "127.0.0.1"
    assert received["sender"] == f"<{SENDER}>"
    assert received["recipients"] == queued["recipients"] == "once@example.com"
    assert first["reply"].startswith("451") and deferred["reply"].startswith("451")
    assert "next_attempt" in deferred
    assert second["reply"].startswith("250") and delivered["reply"].startswith("250")
    assert first["hop"] == f"127.0.0.1:{relay.sink.port}" and first["tls"] == "no"
    [trace_id] = {e.get("trace_id", "") for e in events}
    assert len(trace_id) == 32
    wait_until(
        lambda: any(s.trace_id == trace_id for s in relay.traces.spans), 30, "the trace's spans"
    )

    timeline = _admin(relay, "history", queue_id)
    assert timeline.returncode == 0, timeline.stderr
    assert timeline.stdout.startswith(f"{queue_id}  trace {trace_id}\n")
    assert "ingress  received   client=127.0.0.1" in timeline.stdout


def test_a_bounce_shows_the_notification_sent(relay: Relay) -> None:
    relay.sink.behaviour.rejected["gone@example.com"] = "550 5.1.1 <gone@example.com>: no such user"
    queue_id = _send(relay, "gone@example.com")
    expected = [
        ("ingress", "received"),
        ("queue", "queued"),
        ("queue", "dispatched"),
        ("delivery", "attempt"),
        ("queue", "bounced"),
        ("queue", "dsn"),
    ]
    events = _history_with(relay, queue_id, *expected)
    assert _steps(events) == expected
    dsn = events[-1]["details"]
    assert dsn["action"] == "failed"
    assert dsn["to"] == f"<{SENDER}>"
    assert dsn["recipients"] == "gone@example.com"
    [notice] = relay.bounce_sink.wait_for(1)
    assert dsn["notice"] in notice.content.decode()
    # The notification is a message with a history of its own, in the same trace.
    notice_steps = [
        ("queue", "queued"),
        ("queue", "dispatched"),
        ("delivery", "attempt"),
        ("delivery", "delivered"),
    ]
    notice_events = _history_with(relay, dsn["notice"], *notice_steps)
    assert _steps(notice_events) == notice_steps
    assert {e.get("trace_id", "") for e in notice_events} == {events[0].get("trace_id")}


def test_a_bounced_notification_says_why_no_notification_follows(relay: Relay) -> None:
    relay.sink.behaviour.rejected["nonotice@example.com"] = "550 5.1.1 no such user"
    queue_id = _send(relay, "nonotice@example.com", sender="")
    events = _history_with(relay, queue_id, ("queue", "bounced"), ("queue", "dsn withheld"))
    assert _steps(events)[-2:] == [("queue", "bounced"), ("queue", "dsn withheld")]
    withheld = events[-1]["details"]
    assert withheld["action"] == "failed"
    assert withheld["recipients"] == "nonotice@example.com"
    assert "null sender" in withheld["reason"]
    assert "notice" not in withheld


def test_an_attempt_without_a_next_hop_is_in_the_history(relay: Relay) -> None:
    queue_id = _send(relay, "r@broken.test")
    events = _history_with(relay, queue_id, ("delivery", "attempt"), ("queue", "deferred"))
    attempt = next(e["details"] for e in events if e["event"] == "attempt")
    assert attempt["reply"].startswith("451 4.3.5 route unusable is unusable")
    assert (attempt["attempt"], attempt["recipient"]) == ("1", "r@broken.test")
    assert "hop" not in attempt and "tls" not in attempt
    assert _admin(relay, "delete", queue_id).returncode == 0


def test_hold_release_and_delete_by_an_administrator(relay: Relay) -> None:
    queue_id = _send(relay, "admin@stuck.test")
    _history_with(relay, queue_id, ("queue", "deferred"))
    for action in ("hold", "release", "delete"):
        result = _admin(relay, action, queue_id)
        assert result.returncode == 0, result.stderr
    administered_steps = [("queue", "held"), ("queue", "released"), ("queue", "deleted")]
    events = _history_with(relay, queue_id, ("ingress", "received"), *administered_steps)
    # Released, it is tried again at once: an attempt may come before the delete.
    administered = [e["event"] for e in events if e["event"] in ("held", "released", "deleted")]
    assert administered == ["held", "released", "deleted"]
    [trace_id] = {e.get("trace_id", "") for e in events}
    assert trace_id


def test_search_by_recipient_and_by_sender_since_a_time(relay: Relay) -> None:
    mine = _send(relay, "searched@example.com", sender="searcher@senders.test")
    other = _send(relay, "other@example.com")
    for queue_id in (mine, other):
        _history_with(relay, queue_id, ("ingress", "received"), ("delivery", "delivered"))

    by_recipient = _history(relay, "--rcpt", "Searched@EXAMPLE.com", "--since", "10m")
    assert {e["queue_id"] for e in by_recipient} == {mine}
    assert _steps(by_recipient)[0] == ("ingress", "received")
    by_sender = _history(relay, "--sender", "searcher@senders.test", "--since", "10m")
    assert {e["queue_id"] for e in by_sender} == {mine}
    # --since bounds the search: none of its events is from the last millisecond.
    assert _history(relay, "--sender", "searcher@senders.test", "--since", "1ms") == []
    assert _history(relay, "--sender", "nobody@senders.test") == []

    usage = _admin(relay, "history", mine, "--rcpt", "searched@example.com")
    assert usage.returncode == 2
