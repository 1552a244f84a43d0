"""The mail path end to end: SMTP in, JetStream, SMTP out, on real sockets and a real NATS."""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.nats import NatsServer
from tests.support.processes import port_open, smtp_banner, wait_until
from tests.support.relay import (
    ServiceRelay,
    UpRelay,
    documents,
    inbound_domain,
    route,
    stored_jobs,
    trusting,
    wait_until_drained,
)
from tests.support.sink import Received, Sink


def _message(marker: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: sender@client.test\r\nTo: rcpt@example.com\r\nSubject: {marker}\r\n"
        f"Message-ID: <{marker}@client.test>\r\n\r\n"
    ).encode() + body


def _strip_trace_headers(content: bytes) -> bytes:
    """The message as the client sent it: without the Received header ingress prepends."""
    assert content.startswith(b"Received: "), content[:200]
    end = content.index(b"\r\n", len(b"Received: "))
    while content[end + 2 : end + 3] in (b"\t", b" "):
        end = content.index(b"\r\n", end + 2)
    return content[end + 2 :]


def _marker(message: Received) -> str:
    for line in message.content.split(b"\r\n"):
        if line.startswith(b"Subject: "):
            return line[len(b"Subject: ") :].decode()
    raise AssertionError("no Subject in delivered message")


def _local_config(sink: Sink) -> str:
    return documents(
        inbound_domain("example.com"),
        route("to-sink", ["example.com", "*.example.org"], sink.port),
        trusting("127.0.0.0/8"),
    )


def test_500_concurrent_messages_arrive_exactly_once_byte_identical(
    tmp_path: Path, sink: Sink
) -> None:
    sent: dict[str, bytes] = {}
    lock = threading.Lock()

    def client(worker: int) -> None:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
            for number in range(50):
                marker = f"m-{worker}-{number}-{uuid.uuid4().hex[:8]}"
                # Lines that need dot-stuffing and a long line, to prove transparency.
                body = f".leading dot\r\n..two dots\r\n{'x' * 900}\r\nbye {marker}\r\n".encode()
                message = _message(marker, body)
                smtp.sendmail("sender@client.test", ["rcpt@example.com"], message)
                with lock:
                    sent[marker] = message

    with UpRelay(tmp_path, _local_config(sink)) as relay:
        with ThreadPoolExecutor(max_workers=10) as pool:
            list(pool.map(client, range(10)))
        assert len(sent) == 500
        sink.wait_for(500, timeout=120)
        # Exactly once: the queue must be empty, so nothing more can arrive.
        wait_until_drained(relay.nats_url, 60)
        # The queue purges the jobs delivery acknowledged (every 5 s).
        wait_until(lambda: stored_jobs(relay.nats_url) == 0, 30, "the jobs to be purged")
    counts = Counter(_marker(m) for m in sink.messages)
    assert set(counts) == set(sent)
    assert max(counts.values()) == 1
    for message in sink.messages:
        assert _strip_trace_headers(message.content) == sent[_marker(message)]


def test_8bit_smtputf8_and_10mb_messages(tmp_path: Path, sink: Sink) -> None:
    eight_bit = _message("eight-bit", "Grüße aus Köln — ünïcödé\r\n".encode())
    utf8_address = "jürgen@example.com"
    utf8_message = _message("smtputf8", "Ein Brief an Jürgen.\r\n".encode())
    line = b"0123456789" * 99 + b"\r\n"
    big = _message("ten-megabytes", line * (10 * 1024 * 1024 // len(line)))
    with UpRelay(tmp_path, _local_config(sink)) as relay:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=120) as smtp:
            smtp.sendmail("a@client.test", ["rcpt@example.com"], eight_bit, ["BODY=8BITMIME"])
            smtp.sendmail("a@client.test", [utf8_address], utf8_message, ["SMTPUTF8"])
            smtp.sendmail("a@client.test", ["rcpt@example.com"], big)
        sink.wait_for(3, timeout=120)
    by_marker = {_marker(m): m for m in sink.messages}
    assert _strip_trace_headers(by_marker["eight-bit"].content) == eight_bit
    assert _strip_trace_headers(by_marker["smtputf8"].content) == utf8_message
    assert by_marker["smtputf8"].recipients == (utf8_address,)
    assert _strip_trace_headers(by_marker["ten-megabytes"].content) == big
    assert len(big) > 10_000_000


def test_recipients_on_two_routes_arrive_at_both(tmp_path: Path) -> None:
    with Sink() as first, Sink() as second:
        config = documents(
            route("first", ["one.test"], first.port),
            route("second", ["two.test"], second.port),
            trusting("127.0.0.0/8"),
        )
        with UpRelay(tmp_path, config) as relay:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port) as smtp:
                smtp.sendmail("a@client.test", ["x@one.test", "y@two.test"], _message("split"))
            [at_first] = first.wait_for(1)
            [at_second] = second.wait_for(1)
    assert at_first.recipients == ("x@one.test",)
    assert at_second.recipients == ("y@two.test",)
    assert _strip_trace_headers(at_first.content) == _strip_trace_headers(at_second.content)


def test_relay_to_an_unlisted_domain_from_an_untrusted_client_is_refused(
    tmp_path: Path, sink: Sink
) -> None:
    # No RelayPolicy: nothing is trusted; only example.com is accepted inbound.
    config = documents(inbound_domain("example.com"), route("all", ["*"], sink.port))
    with UpRelay(tmp_path, config) as relay:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port) as smtp:
            smtp.ehlo()
            smtp.mail("spammer@client.test")
            code, reply = smtp.rcpt("victim@elsewhere.test")
            assert (code, reply[:5]) == (554, b"5.7.1")
            code, _ = smtp.rcpt("someone@example.com")
            assert code == 250
            smtp.rset()
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                smtp.sendmail("spammer@client.test", ["victim@elsewhere.test"], _message("x"))
            smtp.sendmail("friend@client.test", ["someone@example.com"], _message("inbound"))
        [delivered] = sink.wait_for(1)
    assert delivered.recipients == ("someone@example.com",)


def test_nats_outage_answers_451_and_loses_nothing(
    tmp_path: Path, sink: Sink, nats_server: NatsServer
) -> None:
    relay = ServiceRelay(tmp_path, nats_server.url)
    relay.publish(_local_config(sink))
    with relay:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
            smtp.sendmail("a@client.test", ["rcpt@example.com"], _message("before"))
        sink.wait_for(1)

        nats_server.stop()
        with (
            smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp,
            pytest.raises(smtplib.SMTPDataError) as refused,
        ):
            smtp.sendmail("a@client.test", ["rcpt@example.com"], _message("during"))
        assert refused.value.smtp_code == 451
        error_text = refused.value.smtp_error
        assert isinstance(error_text, bytes) and error_text.startswith(b"4.3.0")

        nats_server.start()

        def accepted_again() -> bool:
            try:
                with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
                    smtp.sendmail("a@client.test", ["rcpt@example.com"], _message("after"))
                return True
            except smtplib.SMTPDataError as error:
                assert error.smtp_code == 451  # still reconnecting: a clean temporary refusal
                return False

        wait_until(accepted_again, 60, "ingress to accept mail again after NATS came back")
        delivered = sink.wait_for(2, timeout=60)
    assert sorted(_marker(m) for m in delivered) == ["after", "before"]


@pytest.mark.slow
def test_kill_9_of_delivery_while_mail_flows_loses_nothing(tmp_path: Path, sink: Sink) -> None:
    accepted: list[str] = []

    with UpRelay(tmp_path, _local_config(sink)) as relay:
        first_pid = relay.pid("delivery")

        def send(count: int, prefix: str) -> None:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
                for number in range(count):
                    marker = f"{prefix}-{number}"
                    smtp.sendmail("a@client.test", ["rcpt@example.com"], _message(marker))
                    accepted.append(marker)

        send(100, "before")
        sink.wait_for(20, timeout=60)  # delivery is busy when it is killed
        os.kill(first_pid, signal.SIGKILL)
        send(100, "after")
        wait_until(lambda: relay.pid("delivery") != first_pid, 30, "delivery to be restarted")
        sink.wait_for(200, timeout=180)
        wait_until_drained(relay.nats_url, 60)
    delivered = Counter(_marker(m) for m in sink.messages)
    assert set(delivered) == set(accepted)
    # At-least-once: a kill can duplicate the few messages in flight, never more.
    assert sum(delivered.values()) - len(delivered) <= 32


def test_ingress_listens_only_once_it_has_a_routing_table(
    tmp_path: Path, sink: Sink, nats_server: NatsServer
) -> None:
    relay = ServiceRelay(tmp_path, nats_server.url)
    relay.start("queue")
    relay.start("delivery")
    relay.start("ingress", wait=False)
    try:
        wait_until(
            lambda: "waiting for the first routing table" in (tmp_path / "ingress.log").read_text(),
            30,
            "ingress to wait for its table",
        )
        assert not port_open(relay.smtp_port)
        relay.publish(_local_config(sink))
        wait_until(lambda: smtp_banner(relay.smtp_port), 30, "ingress to listen")
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
            smtp.sendmail("a@client.test", ["rcpt@example.com"], _message("after-table"))
        [delivered] = sink.wait_for(1)
    finally:
        relay.__exit__(None, None, None)
    assert _marker(delivered) == "after-table"
