"""A 250 means the message is on disk: every 250 follows an fsync that covers its message.

The method: nats-server runs under strace (a wrapper first on the PATH of
`kurrier up`), which logs, with wall-clock times, every pwrite64 to a
JetStream block file (with the start of what was written, which names the
subject) and every fsync/fdatasync. For each message the test sends, it
finds the write of its record (`$KV.kurrier-messages.<id>`, which holds a
body of up to 256 KiB, and whose storing is the acceptance: the jobs follow
the answer) and, for a larger body, the write of the body beside it
(`kurrier.body.<id>`), and requires an fsync of the same file after each
and before the client saw 250.

With atomic batches (`--atomic-batch-min`) a batch is first staged in a
store of its own (`<stream>/batches/`), synced too; only the writes to the
stream's own blocks, at the commit, count here.

Why strace and not a lost-write device: dm-flakey, dm-log-writes and a
FUSE layer that drops unsynced writes need kernel modules or /dev/fuse,
which this machine's sandbox does not offer; strace needs only ptrace of a
child process. The control case, with syncing relaxed to NATS's 2-minute
default, must fail the same check, which shows the check can fail.
"""

from __future__ import annotations

import os
import smtplib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kurrier.core.body_store import ATTACHED_BODY_LIMIT

from bench.traced_nats import Event, block_file_events, install_traced_nats_server
from tests.support.relay import UpRelay, documents, route, trusting
from tests.support.sink import Sink

pytestmark = pytest.mark.slow

MESSAGES = 20
SESSIONS = 10
# (queue id, time DATA began, time 250 came) of each message sent.
Sent = list[tuple[str, float, float]]


# Past what a record keeps (ATTACHED_BODY_LIMIT): a body of its own, written
# beside the record.
LARGER_BODY = "x" * 70 + "\r\n"
LARGER_LINES = ATTACHED_BODY_LIMIT // len(LARGER_BODY) + 1


def _send(port: int, messages: int = MESSAGES, lines: int = 1) -> Sent:
    """Messages one at a time on one session, of so many lines of text."""
    sent = []
    text = "x\r\n" if lines == 1 else LARGER_BODY * lines
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        for number in range(messages):
            smtp.mail("a@client.test")
            smtp.rcpt("r@example.com")
            began = time.time()
            code, reply = smtp.data(f"Subject: durable {number}\r\n\r\n{text}".encode())
            answered = time.time()
            assert code == 250, reply
            sent.append((reply.decode().rsplit(" ", 1)[-1], began, answered))
    return sent


def _unsynced(events: list[Event], sent: Sent, bodies: bool = False) -> list[str]:
    """What was acknowledged before a sync covered it; [] when every 250 followed one.

    The record is the acceptance (its jobs follow the answer: the sweeper
    dispatches a record whose job was lost); with bodies, the body stored
    beside it must be synced too."""
    problems = []
    for queue_id, began, answered in sent:
        subjects = [f"$KV.kurrier-messages.{queue_id}"]
        if bodies:
            subjects.append(f"kurrier.body.{queue_id}")
        for subject in subjects:
            problems += _unsynced_write(events, subject, began, answered)
    return problems


def _unsynced_write(events: list[Event], subject: str, began: float, answered: float) -> list[str]:
    """[] when subject was written between began and answered and synced before answered."""
    writes = [e for e in events if e.call == "pwrite64" and subject in e.written and not _staged(e)]
    if not writes or not began <= writes[0].at <= answered:
        return [f"{subject}: no write seen between DATA and 250"]
    write = writes[0]
    synced = any(
        e.call != "pwrite64" and e.path == write.path and write.at <= e.at <= answered
        for e in events
    )
    if not synced:
        return [f"{subject}: written at {write.at:.6f}, 250 at {answered:.6f}"]
    return []


def _staged(event: Event) -> bool:
    """A write to an atomic batch's staging store, not to its stream's blocks."""
    return "/batches/" in event.path


def _send_side_by_side(port: int) -> Sent:
    """The messages over SESSIONS sessions at once, so that their writes pile up."""
    with ThreadPoolExecutor(SESSIONS) as pool:
        sessions = pool.map(_send, [port] * SESSIONS, [MESSAGES // 4] * SESSIONS)
        return [message for session in sessions for message in session]


def _run(
    tmp_path: Path,
    sink: Sink,
    *flags: str,
    send: Callable[[int], Sent] = _send,
    bodies: bool = False,
) -> tuple[list[str], list[Event]]:
    bindir, trace = tmp_path / "bin", tmp_path / "nats.strace"
    bindir.mkdir()
    install_traced_nats_server(bindir, trace)
    config = documents(route("to-sink", ["example.com"], sink.port), trusting("127.0.0.0/8"))
    path = f"{bindir}{os.pathsep}{os.environ['PATH']}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", path)
        with UpRelay(tmp_path, config, *flags) as relay:
            sent = send(relay.smtp_port)
    events = block_file_events(trace)
    return _unsynced(events, sent, bodies), events


def test_every_250_follows_a_sync_of_its_record(tmp_path: Path, sink: Sink) -> None:
    assert _run(tmp_path, sink)[0] == []


def test_every_250_follows_a_sync_of_its_record_and_the_body_beside_it(
    tmp_path: Path, sink: Sink
) -> None:
    problems, _ = _run(
        tmp_path, sink, send=lambda port: _send(port, lines=LARGER_LINES), bodies=True
    )
    assert problems == []


def test_every_250_follows_a_sync_when_messages_share_atomic_batches(
    tmp_path: Path, sink: Sink
) -> None:
    problems, events = _run(tmp_path, sink, "--atomic-batch-min", "2", send=_send_side_by_side)
    assert problems == []
    assert any(_staged(e) for e in events), "no atomic batch was staged: nothing shared a sync"


def test_with_syncing_relaxed_the_same_check_finds_unsynced_250s(
    tmp_path: Path, sink: Sink
) -> None:
    # Relaxed past the test's length: the check must see what syncing protects
    # against, for records and for the bodies written beside them.
    problems, _ = _run(
        tmp_path,
        sink,
        "--nats-sync",
        "1h",
        send=lambda port: _send(port, lines=LARGER_LINES),
        bodies=True,
    )
    assert len(problems) == 2 * MESSAGES, problems
