"""The queue behaves like an MTA's: retries, bounces (RFC 3464), expiry, admin, connection reuse.

Every test runs the real `kurrier up` against programmable sinks on real sockets.
"""

from __future__ import annotations

import json
import signal
import smtplib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.dsn_report import parse_report
from tests.support.processes import wait_until
from tests.support.relay import UpRelay, documents, route, trusting, wait_until_drained
from tests.support.sink import Sink


def _message(subject: str) -> bytes:
    return f"From: s@senders.test\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


@pytest.fixture
def bounce_sink() -> Iterator[Sink]:
    """Where mail for senders.test (i.e. the notifications) goes."""
    with Sink() as running:
        yield running


def _config(sink: Sink, bounce_sink: Sink, **route_options: str) -> str:
    return documents(
        route("to-sink", ["example.com"], sink.port, 100, **route_options),
        route("to-senders", ["senders.test"], bounce_sink.port),
        trusting("127.0.0.0/8"),
    )


def _send(relay: UpRelay, sender: str, recipients: list[str], message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
        smtp.sendmail(sender, recipients, message)


def _listing(relay: UpRelay, *filters: str) -> list[dict[str, Any]]:
    result = relay.queue_admin("list", "--json", *filters)
    assert result.returncode == 0, result.stderr
    messages: list[dict[str, Any]] = json.loads(result.stdout).get("messages", [])
    return messages


def test_deferred_then_delivered_exactly_once(
    tmp_path: Path, sink: Sink, bounce_sink: Sink
) -> None:
    sink.behaviour.temp_failures = 2
    with UpRelay(tmp_path, _config(sink, bounce_sink)) as relay:
        _send(relay, "s@senders.test", ["r@example.com"], _message("retried"))
        [delivered] = sink.wait_for(1, timeout=60)
        wait_until_drained(relay.nats_url, 30)
    assert len(sink.messages) == 1
    assert sink.behaviour.temp_failures == 0
    assert b"Subject: retried" in delivered.content
    assert bounce_sink.messages == []


def test_550_for_one_recipient_bounces_it_and_delivers_the_other(
    tmp_path: Path, sink: Sink, bounce_sink: Sink
) -> None:
    sink.behaviour.rejected["gone@example.com"] = "550 5.1.1 <gone@example.com>: user unknown"
    with UpRelay(tmp_path, _config(sink, bounce_sink)) as relay:
        _send(relay, "s@senders.test", ["gone@example.com", "ok@example.com"], _message("mixed"))
        [delivered] = sink.wait_for(1)
        [notice] = bounce_sink.wait_for(1)
        wait_until_drained(relay.nats_url, 30)
    assert delivered.recipients == ("ok@example.com",)
    assert notice.mail_from == "<>"  # notifications come from the null sender
    assert notice.recipients == ("s@senders.test",)
    report = parse_report(notice.content)
    assert report.message["Auto-Submitted"] == "auto-replied"
    [per_recipient] = report.per_recipient
    assert per_recipient["Final-Recipient"] == "rfc822; gone@example.com"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@example.com>: user unknown"
    assert b"Subject: mixed" in notice.content  # the original comes back


def test_expired_message_bounces_with_the_last_reply(
    tmp_path: Path, sink: Sink, bounce_sink: Sink
) -> None:
    sink.behaviour.temp_failures = 10_000
    sink.behaviour.temp_failure_reply = "451 4.7.1 greylisted, come back later"
    config = _config(sink, bounce_sink)
    with UpRelay(tmp_path, config, "--max-lifetime", "3s") as relay:
        _send(relay, "s@senders.test", ["slow@example.com"], _message("expiring"))
        [notice] = bounce_sink.wait_for(1, timeout=60)
        wait_until_drained(relay.nats_url, 30)
        # Its history ends with the expiry and the notification that reported it.
        events: list[dict[str, Any]] = []

        def expiry_in_history() -> bool:
            found = relay.queue_admin("history", "--json", "--rcpt", "slow@example.com")
            assert found.returncode == 0, found.stderr
            events[:] = json.loads(found.stdout).get("events", [])
            return [e["event"] for e in events][-2:] == ["expired", "dsn"]

        wait_until(expiry_in_history, 30, "the expiry in the message's history")
        expired, dsn = (e["details"] for e in events[-2:])
        assert expired["recipient"] == "slow@example.com"
        assert expired["reply"] == "451 4.7.1 greylisted, come back later"
        assert (dsn["action"], dsn["recipients"]) == ("failed", "slow@example.com")
    assert sink.messages == []
    [per_recipient] = parse_report(notice.content).per_recipient
    assert per_recipient["Final-Recipient"] == "rfc822; slow@example.com"
    assert per_recipient["Status"] == "4.7.1"
    assert "greylisted" in per_recipient["Diagnostic-Code"]


def test_failing_notifications_are_never_bounced_again(
    tmp_path: Path, sink: Sink, bounce_sink: Sink
) -> None:
    sink.behaviour.rejected["gone@example.com"] = "550 5.1.1 user unknown"
    bounce_sink.behaviour.rejected["s@senders.test"] = "550 5.1.1 the sender is gone too"
    with UpRelay(tmp_path, _config(sink, bounce_sink)) as relay:
        # A bounce that bounces, and a message from <> that fails: both end here.
        _send(relay, "s@senders.test", ["gone@example.com"], _message("double"))
        _send(relay, "", ["gone@example.com"], _message("from-null-sender"))
        wait_until_drained(relay.nats_url, 60)
        log = (tmp_path / "up.log").read_text()
    assert sink.messages == [] and bounce_sink.messages == []
    assert log.count("undeliverable notification to") == 2


def test_admin_commands(tmp_path: Path, sink: Sink, bounce_sink: Sink) -> None:
    sink.behaviour.temp_failures = 10_000
    config = _config(sink, bounce_sink)
    # Long backoff: messages stay deferred until the admin says otherwise.
    with UpRelay(tmp_path, config, "--min-backoff", "1h", "--max-backoff", "1h") as relay:
        for number in range(3):
            _send(relay, "s@senders.test", [f"r{number}@example.com"], _message(f"m{number}"))
        wait_until(
            lambda: len(_listing(relay, "--state", "deferred")) == 3, 30, "three deferred messages"
        )
        listing = _listing(relay)
        ids = [m["queue_id"] for m in listing]
        assert listing[0]["recipients"][0]["last_reply"] == "451 4.3.0 try again later"

        text = relay.queue_admin("list")
        assert text.returncode == 0
        assert "(451 4.3.0 try again later)" in text.stdout
        assert text.stdout.rstrip().endswith("in 3 Requests.")

        shown = relay.queue_admin("show", ids[0])
        assert shown.returncode == 0
        assert f"Queue ID:     {ids[0]}" in shown.stdout
        # Sent from 127.0.0.1, which _config trusts: its sender gets notifications.
        assert "Client:       127.0.0.1 (HELO " in shown.stdout
        assert ", trusted network)" in shown.stdout
        assert "Subject: m0" in shown.stdout
        assert relay.queue_admin("show", "NOSUCHID0000").returncode == 1

        assert relay.queue_admin("hold", ids[0]).returncode == 0
        assert [m["queue_id"] for m in _listing(relay, "--state", "held")] == [ids[0]]
        assert relay.queue_admin("delete", "--all").returncode == 2  # needs --yes too
        assert relay.queue_admin("hold").returncode == 2  # ids or --all
        assert relay.queue_admin("delete", ids[1]).returncode == 0
        assert {m["queue_id"] for m in _listing(relay)} == {ids[0], ids[2]}

        # Now let mail through: retry one, flush the rest; the held one stays.
        sink.behaviour.temp_failures = 0
        assert relay.queue_admin("retry", ids[2]).returncode == 0
        [first] = sink.wait_for(1)
        assert first.recipients == ("r2@example.com",)
        flushed = relay.queue_admin("flush")
        assert flushed.returncode == 0
        assert [m["queue_id"] for m in _listing(relay)] == [ids[0]]
        assert relay.queue_admin("release", ids[0]).returncode == 0
        sink.wait_for(2)
        wait_until_drained(relay.nats_url, 30)
    assert sorted(m.recipients[0] for m in sink.messages) == ["r0@example.com", "r2@example.com"]


def test_connections_are_reused_and_capped_per_destination(
    tmp_path: Path, sink: Sink, bounce_sink: Sink
) -> None:
    config = _config(sink, bounce_sink, maxConnections="3")
    with UpRelay(tmp_path, config) as relay:

        def client(worker: int) -> None:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
                for number in range(20):
                    smtp.sendmail(
                        "s@senders.test", ["r@example.com"], _message(f"{worker}-{number}")
                    )

        with ThreadPoolExecutor(max_workers=10) as pool:
            list(pool.map(client, range(10)))
        sink.wait_for(200, timeout=120)
    assert sink.max_connections_open <= 3
    assert sink.connections_total <= 20, sink.connections_total


def _delivery_stopping(relay: UpRelay) -> bool:
    log = (relay.workdir / "up.log").read_text(errors="replace")
    return any(
        '"kurrier-delivery"' in line and "taking no more jobs" in line for line in log.splitlines()
    )


def test_orderly_shutdown_with_mail_in_flight_delivers_everything_once(
    tmp_path: Path, sink: Sink, bounce_sink: Sink
) -> None:
    # The next hop holds every transaction until delivery has been told to stop,
    # so SIGTERM meets transactions in flight and a backlog behind them, however
    # fast or slow the machine.
    gate = sink.behaviour.data_gate = threading.Event()
    config = _config(sink, bounce_sink, maxConnections="2")
    accepted = []
    try:
        with UpRelay(tmp_path, config) as relay:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
                for number in range(100):
                    smtp.sendmail("s@senders.test", ["r@example.com"], _message(f"drain-{number}"))
                    accepted.append(f"drain-{number}")
            wait_until(lambda: sink.transactions_held >= 2, 60, "two transactions held")
            assert relay.process is not None
            relay.process.send_signal(signal.SIGTERM)
            wait_until(lambda: _delivery_stopping(relay), 60, "delivery to stop taking jobs")
            gate.set()
    finally:
        gate.set()
    assert relay.process.returncode == 0
    # The jobs delivery held when told to stop were finished; the backlog waited.
    assert 2 <= len(sink.messages) < 100
    # The same data dir again: whatever was left is delivered, nothing twice.
    with UpRelay(tmp_path, config) as relay:
        sink.wait_for(100, timeout=120)
        wait_until_drained(relay.nats_url, 30)
    subjects = [
        line.removeprefix(b"Subject: ").decode()
        for message in sink.messages
        for line in message.content.split(b"\r\n")
        if line.startswith(b"Subject: ")
    ]
    assert sorted(subjects) == sorted(accepted)
