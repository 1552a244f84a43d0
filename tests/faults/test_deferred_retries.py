"""Deferred mail in the production shape: two or three queue processes (and two
delivery processes) share the results and the due retries, on one NATS node or
a three-node cluster. The next hop is in trouble for a while, in each way a
next hop can be (refusing connections, then 421 at the greeting, 451 at MAIL,
RCPT and DATA); every message must be retried at its backoff all along, and
delivered within a few backoffs of the next hop's return. The sweeper, which
would rescue a lost retry after a minute or more, is never given the chance.
"""

from __future__ import annotations

import contextlib
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import free_port, kurrier_argv, stop_process, wait_until
from tests.support.relay import (
    FAST_RETRIES,
    NATS_BUSY,
    UpRelay,
    documents,
    message_records,
    route,
    trusting,
)
from tests.support.sink import Sink

pytestmark = pytest.mark.slow

MESSAGES = 24
# Attempts every message must have had while the next hop was in trouble:
# enough that its retries moved between queue processes several times.
ATTEMPTS_DURING_OUTAGE = 3
# Backoff is 1-2 s (FAST_RETRIES); a schedule fires on the whole second after.
# The sweeper would need at least SWEEP_SLACK (60 s) to notice a lost retry.
DELIVERED_WITHIN = 20.0

OUTAGES = [
    ("refused", None, ""),
    ("greeting 421", "greeting", "421 4.3.2 service shutting down"),
    ("MAIL 451", "MAIL", "451 4.3.0 try again later"),
    ("RCPT 451", "RCPT", "451 4.4.3 try again later"),
    ("DATA 451", "DATA", "451 4.3.0 try again later"),
]


def _extra_queue(relay: UpRelay, number: int, replicas: int) -> subprocess.Popen[bytes]:
    """One more `kurrier queue` on the relay's NATS, as another pod would be."""
    log = (relay.workdir / f"queue-extra-{number}.log").open("ab")
    return subprocess.Popen(
        kurrier_argv(
            "queue",
            "--nats-url",
            relay.nats_url,
            "--nats-replicas",
            str(replicas),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--hostname",
            "relay.test",
            "--metrics-listen",
            "off",
            *FAST_RETRIES,
        ),
        stdout=log,
        stderr=log,
    )


@contextlib.contextmanager
def _queue_processes(relay: UpRelay, extra: int, replicas: int) -> Iterator[None]:
    processes = [_extra_queue(relay, number, replicas) for number in range(extra)]
    try:
        for number, process in enumerate(processes):
            _wait_until_serving(process, relay.workdir / f"queue-extra-{number}.log")
        yield
    finally:
        for process in processes:
            stop_process(process)


def _wait_until_serving(process: subprocess.Popen[bytes], log: Path) -> None:
    wait_until(
        lambda: process.poll() is not None or "queue listening on" in log.read_text(),
        30,
        "the extra queue process to serve",
    )
    assert process.poll() is None, f"the extra queue process died; see {log}"


@contextlib.contextmanager
def _stopped_at_the_end(sink: Sink) -> Iterator[Sink]:
    """The sink is started by the test, once its first outage ends."""
    try:
        yield sink
    finally:
        with contextlib.suppress(Exception):
            sink.__exit__()


def _attempts(relay: UpRelay, subjects: dict[str, str]) -> dict[str, int] | None:
    """Attempts so far of each of these messages still queued (by queue id); None if
    NATS did not answer."""
    try:
        records = message_records(relay.nats_url)
    except NATS_BUSY:
        return None
    return {r.queue_id: r.recipients[0].attempts for r in records if r.queue_id in subjects}


def _send(port: int, outage: str) -> dict[str, str]:
    """MESSAGES messages, one session; returns subject by queue id."""
    sent: dict[str, str] = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        for number in range(MESSAGES):
            subject = f"{outage} {number}"
            smtp.mail("a@client.test")
            smtp.rcpt(f"r{number}@example.com")
            code, reply = smtp.data(f"Subject: {subject}\r\n\r\nretry me\r\n".encode())
            assert code == 250, reply
            sent[reply.decode().rsplit(" ", 1)[-1]] = subject
    return sent


def _through_an_outage(
    relay: UpRelay, sink: Sink, outage: str, phase: str | None, reply: str
) -> None:
    """Send while the next hop is in trouble, wait until every message was retried
    while it lasted, end it and require every message delivered soon after."""
    if phase is not None:
        sink.behaviour.outage_phase, sink.behaviour.outage_reply = phase, reply
    sent = _send(relay.smtp_port, outage)
    seen: dict[str, int] = {}

    def retried_enough() -> bool:
        attempts = _attempts(relay, sent)
        if attempts is None:
            return False
        seen.update(attempts)
        return len(attempts) == MESSAGES and min(attempts.values()) >= ATTEMPTS_DURING_OUTAGE

    try:
        wait_until(retried_enough, 60, f"every message tried {ATTEMPTS_DURING_OUTAGE} times")
    except AssertionError as error:
        stalled = {sent[q]: n for q, n in seen.items() if n < ATTEMPTS_DURING_OUTAGE}
        raise AssertionError(f"{outage}: {error}; stalled: {stalled}") from None
    if phase is None:
        sink.__enter__()
    else:
        sink.behaviour.outage_phase = None
    wanted = set(sent.values())

    def delivered() -> set[str]:
        return {m.content.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in sink.messages}

    try:
        wait_until(lambda: wanted <= delivered(), DELIVERED_WITHIN, "every message delivered")
    except AssertionError as error:
        missing = sorted(wanted - delivered())
        raise AssertionError(
            f"{outage}: {error}; {len(missing)} of {MESSAGES} not delivered "
            f"{DELIVERED_WITHIN:.0f} s after the next hop's return: {missing}"
        ) from None


@pytest.mark.parametrize(
    ("nats_nodes", "queue_processes"),
    [(1, 2), (1, 3), (3, 2), (3, 3)],
    ids=[
        "one-node-two-queues",
        "one-node-three-queues",
        "cluster-two-queues",
        "cluster-three-queues",
    ],
)
def test_deferred_mail_is_retried_by_any_queue_process(
    tmp_path: Path, nats_nodes: int, queue_processes: int
) -> None:
    sink = Sink()  # down: nothing listens on its port until the first outage ends
    config = documents(route("to-sink", ["example.com"], sink.port), trusting("127.0.0.0/8"))
    cluster = ("--nats-cluster", str(nats_nodes)) if nats_nodes > 1 else ()
    own_queues = 2 if nats_nodes > 1 else 1
    replicas = min(3, nats_nodes)
    with (
        _stopped_at_the_end(sink),
        UpRelay(tmp_path, config, *cluster) as relay,
        _queue_processes(relay, queue_processes - own_queues, replicas),
    ):
        for outage, phase, reply in OUTAGES:
            _through_an_outage(relay, sink, outage, phase, reply)
    # Each outage after the first was felt by every message, more than once.
    assert sink.outage_replies >= MESSAGES * ATTEMPTS_DURING_OUTAGE * (len(OUTAGES) - 1) // 2
