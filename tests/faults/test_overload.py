"""When the message store is full, ingress says 452 4.3.1 and recovers by itself."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nats import NatsServer
from tests.support.processes import free_port, wait_until
from tests.support.relay import ServiceRelay, documents, queued_count, route, trusting
from tests.support.sink import Sink

BODY = (b"x" * 98 + b"\r\n") * 2000


@pytest.fixture
def small_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-store", tmp_path, max_file_store="4MB")
    server.start()
    yield server
    server.stop()


def _send(port: int, number: int) -> tuple[int, bytes]:
    message = f"Subject: big-{number}\r\n\r\n".encode() + BODY + b"\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        try:
            smtp.sendmail("a@client.test", ["r@example.com"], message)
        except smtplib.SMTPDataError as error:
            return error.smtp_code, bytes(error.smtp_error)  # type: ignore[arg-type]
    return 250, b""


def test_full_store_answers_452_then_recovers(tmp_path: Path, small_nats: NatsServer) -> None:
    next_hop_port = free_port()  # nothing listens yet: every delivery is deferred
    # Bodies may fill half of JetStream's 4 MB; the rest stays free for the records,
    # jobs and results that let the queue drain again.
    relay = ServiceRelay(
        tmp_path, small_nats.url, service_args={"queue": ["--body-store-limit", "2MB"]}
    )
    relay.publish(documents(route("r", ["example.com"], next_hop_port), trusting("127.0.0.0/8")))
    accepted: list[int] = []
    with relay:
        replies = []
        for number in range(60):
            code, text = _send(relay.smtp_port, number)
            replies.append((code, text))
            if code != 250:
                break
            accepted.append(number)
        assert replies[-1][0] == 452, replies[-3:]
        assert replies[-1][1].startswith(b"4.3.1")
        assert 3 <= len(accepted) < 60

        with Sink(port=next_hop_port) as sink:
            sink.wait_for(len(accepted), timeout=120)
            wait_until(lambda: queued_count(small_nats.url) == 0, 60, "the queue to drain")
            assert _send(relay.smtp_port, 1000)[0] == 250  # recovered by itself
            sink.wait_for(len(accepted) + 1, timeout=60)
    delivered = sorted(
        int(re.search(rb"^Subject: big-(\d+)\r$", m.content, re.MULTILINE).group(1))  # type: ignore[union-attr]
        for m in sink.messages
    )
    assert delivered == [*accepted, 1000]
