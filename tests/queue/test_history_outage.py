"""History is best-effort: while it cannot be published, mail flows all the same.

The history stream is deleted under running services (queue, delivery and
ingress as processes on a real nats-server): every publish of a batch then
fails, as it would with the stream's leader gone. Mail is accepted and
delivered regardless, and the events kept meanwhile are published once the
stream is back.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import subprocess
from pathlib import Path

from kurrier.core.jetstream import HISTORY_STREAM, connect, disconnect, ensure_layout

from tests.support.nats import NatsServer
from tests.support.processes import kurrier_argv, wait_until
from tests.support.relay import ServiceRelay, documents, route, trusting
from tests.support.sink import Sink


async def _delete_history(nats_url: str) -> None:
    nc = await connect(nats_url, "test")
    try:
        await nc.jetstream().delete_stream(HISTORY_STREAM)
    finally:
        await disconnect(nc)


async def _restore_history(nats_url: str) -> None:
    nc = await connect(nats_url, "test")
    try:
        await ensure_layout(nc.jetstream())
    finally:
        await disconnect(nc)


def _failed_publishing(log: Path) -> bool:
    return "history: publishing failed" in log.read_text(errors="replace")


def _delivered(relay: ServiceRelay) -> set[str]:
    """The queue ids the history shows delivered, of the last ten minutes' mail from the test."""
    result = subprocess.run(
        kurrier_argv(
            "queue",
            "history",
            "--sender",
            "s@senders.test",
            "--since",
            "10m",
            "--json",
            "--queue-address",
            relay.queue_address,
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    events = json.loads(result.stdout).get("events", [])
    return {event["queue_id"] for event in events if event["event"] == "delivered"}


def test_mail_flows_while_history_cannot_be_published(
    tmp_path: Path, sink: Sink, nats_server: NatsServer
) -> None:
    relay = ServiceRelay(tmp_path, nats_server.url)
    relay.publish(documents(route("to-sink", ["example.com"], sink.port), trusting("127.0.0.0/8")))
    with relay:
        asyncio.run(_delete_history(nats_server.url))
        queue_ids = []
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
            smtp.ehlo()
            for n in range(3):
                smtp.mail("s@senders.test")
                smtp.rcpt(f"r{n}@example.com")
                code, reply = smtp.data(b"Subject: during the outage\r\n\r\nHello.\r\n")
                assert code == 250, reply
                queue_ids.append(reply.decode().rsplit(" ", 1)[-1])
        sink.wait_for(3, timeout=30)
        for service in ("ingress", "queue", "delivery"):
            wait_until(
                lambda: _failed_publishing(tmp_path / f"{service}.log"),  # noqa: B023
                30,
                f"{service} to fail publishing its history",
            )

        asyncio.run(_restore_history(nats_server.url))
        wait_until(
            lambda: _delivered(relay) == set(queue_ids),
            60,
            "the events kept during the outage to be published",
        )
