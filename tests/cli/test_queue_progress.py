"""`kurrier queue flush|hold|release|delete` over many messages: progress on stderr as it
goes (a line per tenth of the work in a log, one line rewritten in place on a
terminal), the result on stdout. A real `kurrier up` (real NATS) holds 250
deferred messages, sent over SMTP.
"""

from __future__ import annotations

import json
import os
import pty
import re
import smtplib
import subprocess
from collections.abc import Iterator

import pytest

from tests.support.processes import free_port, kurrier_argv, wait_until
from tests.support.relay import UpRelay, documents, route, trusting

MESSAGES = 250  # three calls of ACTION_BATCH (100)
# Retried only when told: the deferred messages stay put between the commands.
SLOW_RETRIES = ("--min-backoff", "1h", "--max-backoff", "2h")


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpRelay]:
    # Nothing listens at the next hop: every message is deferred.
    config = documents(route("nowhere", ["stuck.test"], free_port()), trusting("127.0.0.0/8"))
    with UpRelay(tmp_path_factory.mktemp("progress"), config, *SLOW_RETRIES) as up:
        with smtplib.SMTP("127.0.0.1", up.smtp_port, timeout=60) as smtp:
            for number in range(MESSAGES):
                smtp.sendmail("a@client.test", ["r@stuck.test"], f"Subject: {number}\r\n\r\nx\r\n")
        wait_until(lambda: _deferred(up) == MESSAGES, 60, "every message deferred")
        yield up


def _queue(
    relay: UpRelay, *args: str, stderr: int | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kurrier_argv("queue", *args, "--data-dir", str(relay.data_dir)),
        stdout=subprocess.PIPE,
        stderr=stderr if stderr is not None else subprocess.PIPE,
        text=True,
        timeout=120,
    )


def _deferred(relay: UpRelay) -> int:
    listed = _queue(relay, "list", "--state", "deferred", "--json")
    assert listed.returncode == 0, listed.stderr
    total: int = json.loads(listed.stdout).get("total", 0)
    return total


def _read_all(terminal: int) -> str:
    """What was written to a terminal whose writer has exited."""
    chunks = []
    try:
        while chunk := os.read(terminal, 4096):
            chunks.append(chunk)
    except OSError:  # EIO: the other end is closed and everything was read
        pass
    finally:
        os.close(terminal)
    return b"".join(chunks).decode()


def _log_lines(action: str, verb: str, stderr: str) -> None:
    """Two progress lines (at 40% and 80%), then the summary with the time taken."""
    *progress, summary = stderr.splitlines()
    assert progress == [
        f"{action}: 100/{MESSAGES} messages, 100 {verb}",
        f"{action}: 200/{MESSAGES} messages, 200 {verb}",
    ]
    assert re.fullmatch(
        rf"{action}: {MESSAGES}/{MESSAGES} messages, {MESSAGES} {verb} in \d+\.\ds", summary
    )


def test_flush_hold_release_and_delete_show_their_progress(relay: UpRelay) -> None:
    flushed = _queue(relay, "flush")
    assert flushed.returncode == 0, flushed.stderr
    assert flushed.stdout.startswith(f"{MESSAGES} message(s) scheduled for retry\n")
    _log_lines("flush", "scheduled for retry", flushed.stderr)

    # On a terminal: one line, rewritten after each call, ended by the summary.
    terminal, stderr = pty.openpty()
    try:
        held = _queue(relay, "hold", "--all", stderr=stderr)
    finally:
        os.close(stderr)
    shown = _read_all(terminal)
    assert held.returncode == 0
    assert held.stdout.startswith(f"{MESSAGES} message(s) held\n")
    updates = shown.split("\r\x1b[K")
    assert updates[0] == ""
    assert updates[1:4] == [f"hold: {n}/{MESSAGES} messages, {n} held" for n in (100, 200, 250)]
    assert re.fullmatch(
        rf"hold: {MESSAGES}/{MESSAGES} messages, {MESSAGES} held in \d+\.\ds\r\n", updates[4]
    )

    released = _queue(relay, "release", "--all")
    assert released.returncode == 0, released.stderr
    _log_lines("release", "released", released.stderr)

    deleted = _queue(relay, "delete", "--all", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.startswith(f"{MESSAGES} message(s) deleted\n")
    _log_lines("delete", "deleted", deleted.stderr)
    assert _queue(relay, "list").stdout.startswith("Mail queue is empty")


def test_a_few_messages_show_no_progress(relay: UpRelay) -> None:
    # One call's worth: the summary on stdout is all.
    result = _queue(relay, "hold", "NOSUCHMESSAGE0000001")
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("0 message(s) held\n", "")
