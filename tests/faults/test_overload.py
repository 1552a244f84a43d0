"""When the message store is full, ingress says 452 4.3.1 and recovers by itself."""

from __future__ import annotations

import asyncio
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from kurrier.core.jetstream import connect, disconnect
from kurrier.queue.history_search import search_history

from tests.support.nats import NatsServer
from tests.support.processes import free_port, wait_until
from tests.support.relay import ServiceRelay, documents, route, trusting, wait_until_drained
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


def _rejected(nats_url: str) -> list[dict[str, str]]:
    """The details of the refusals the history holds of mail to r@example.com."""

    async def read() -> list[dict[str, str]]:
        nc = await connect(nats_url, "test-history")
        try:
            events = await search_history(nc.jetstream(), "", "", "r@example.com", since=1.0)
            return [e.details for e in events if e.event == "rejected"]
        finally:
            await disconnect(nc)

    return asyncio.run(read())


def test_full_store_answers_452_then_recovers(tmp_path: Path, small_nats: NatsServer) -> None:
    next_hop_port = free_port()  # nothing listens yet: every delivery is deferred
    # Bodies may fill half of JetStream's 4 MB, the history a sixteenth; the rest
    # stays free for the records, jobs and results that let the queue drain again.
    limits = ["--body-store-limit", "2MB", "--history-max-bytes", "256KiB"]
    relay = ServiceRelay(tmp_path, small_nats.url, service_args={"queue": limits})
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
            wait_until_drained(small_nats.url, 60)
            assert _send(relay.smtp_port, 1000)[0] == 250  # recovered by itself
            sink.wait_for(len(accepted) + 1, timeout=60)
        # The refused message is in the history, once ingress could publish it again.
        refusals: list[dict[str, str]] = []

        def refused() -> bool:
            refusals[:] = _rejected(small_nats.url)
            return bool(refusals)

        wait_until(refused, 30, "the refusal in the history")
        [refusal] = refusals
        assert refusal["reply"].startswith("452 4.3.1")
        assert refusal["sender"] == "<a@client.test>"
    delivered = sorted(
        int(re.search(rb"^Subject: big-(\d+)\r$", m.content, re.MULTILINE).group(1))  # type: ignore[union-attr]
        for m in sink.messages
    )
    assert delivered == [*accepted, 1000]
