"""The SMTP load generator: N concurrent sessions submitting like an application.

Each session connects, says EHLO once and sends up to `per_session` messages
on that connection (MAIL, RCPT and DATA pipelined when the server offers
PIPELINING, as a mail library would), then QUITs and reconnects. Every
message carries a unique id (`X-Bench-Id: TAG-SEQ`) and the CLOCK_MONOTONIC
time its transaction started (`X-Bench-T:`), so the sink can tell what
arrived, what arrived twice and how long it took. The whole run is bounded
by a deadline and a message count; each reply by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

SENDER = "loadgen@bench.test"
RECIPIENT = "rcpt@example.com"
# Wrapped prose, as most text bodies are: every other line ends a sentence.
_LINES = (
    b"The quick brown fox jumps over the lazy dog, and the relay carries it on to",
    b"the next hop, which takes it the same way until it reaches its recipient.",
)


class SmtpFailure(Exception):
    """The session broke (network error, timeout, unreadable reply)."""


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    tag: str
    sessions: int
    size: int
    duration: float
    max_messages: int = 1_000_000
    per_session: int = 100
    reply_timeout: float = 60.0
    recipient: str = RECIPIENT


@dataclass
class LoadResult:
    tag: str
    started_ns: int = 0
    ended_ns: int = 0
    # (seq, transaction start ns, final reply ns) of each message answered 250.
    accepted: list[tuple[int, int, int]] = field(default_factory=list)
    refused: int = 0  # a 4xx/5xx to MAIL, RCPT or DATA
    errors: int = 0  # broken or refused sessions
    unanswered: list[int] = field(default_factory=list)  # DATA sent, no final reply
    sessions_opened: int = 0
    sent_bytes: int = 0

    @property
    def attempted(self) -> int:
        return len(self.accepted) + self.refused + len(self.unanswered)


def filler(size: int) -> bytes:
    """A CRLF-terminated body of about `size` bytes of printable lines (none starts with '.')."""
    pair = b"".join(line + b"\r\n" for line in _LINES)
    whole = pair * (size // len(pair) + 1)
    return whole[: max(len(_LINES[0]) + 2, whole.rfind(b"\r\n", 0, size) + 2)]


def message_head(tag: str, seq: int, stamp_ns: int) -> bytes:
    return (
        f"X-Bench-Id: {tag}-{seq}\r\n"
        f"X-Bench-T: {stamp_ns}\r\n"
        f"From: Load Generator <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        f"Subject: bench message {seq}\r\n"
        f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"Message-ID: <{tag}.{seq}@bench.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()


def body_for(size: int) -> bytes:
    """The body that makes a whole message (headers included) about `size` bytes."""
    head_length = len(message_head("x" * 12, 10**6, time.monotonic_ns()))
    return filler(max(80, size - head_length))


class _Run:
    """Shared state of one run: the next sequence number and the deadline."""

    def __init__(self, spec: LoadSpec, result: LoadResult) -> None:
        self.spec = spec
        self.result = result
        self.deadline = time.monotonic() + spec.duration
        self.next_seq = 0
        self.body = body_for(spec.size)

    def take(self) -> int | None:
        if self.next_seq >= self.spec.max_messages or time.monotonic() >= self.deadline:
            return None
        seq = self.next_seq
        self.next_seq += 1
        return seq

    @property
    def over(self) -> bool:
        return self.next_seq >= self.spec.max_messages or time.monotonic() >= self.deadline


async def _read_reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, str]:
    lines: list[bytes] = []
    while True:
        try:
            raw = await asyncio.wait_for(reader.readline(), timeout=timeout)
        except (OSError, TimeoutError, ValueError) as error:
            raise SmtpFailure(f"reading a reply: {error!r}") from error
        if len(raw) < 4 or not raw[:3].isdigit() or len(lines) > 100:
            raise SmtpFailure(f"bad reply line {raw[:80]!r}")
        lines.append(raw[4:].rstrip())
        if raw[3:4] != b"-":
            return int(raw[:3]), b"\n".join(lines).decode(errors="replace")


async def _transaction(
    run: _Run,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    seq: int,
    pipelining: bool,
) -> None:
    spec, result = run.spec, run.result
    started = time.monotonic_ns()
    head = message_head(spec.tag, seq, started)
    size = len(head) + len(run.body)
    mail = f"MAIL FROM:<{SENDER}> SIZE={size}\r\n".encode()
    rcpt = f"RCPT TO:<{spec.recipient}>\r\n".encode()
    timeout = spec.reply_timeout
    if pipelining:
        writer.write(mail + rcpt + b"DATA\r\n")
        mail_code = (await _read_reply(reader, timeout))[0]
        rcpt_code = (await _read_reply(reader, timeout))[0]
        data_code = (await _read_reply(reader, timeout))[0]
    else:
        writer.write(mail)
        mail_code = (await _read_reply(reader, timeout))[0]
        rcpt_code = data_code = 0
        if mail_code == 250:
            writer.write(rcpt)
            rcpt_code = (await _read_reply(reader, timeout))[0]
            if rcpt_code in (250, 251):
                writer.write(b"DATA\r\n")
                data_code = (await _read_reply(reader, timeout))[0]
    if data_code != 354:
        result.refused += 1
        if mail_code == 250:
            writer.write(b"RSET\r\n")
            await _read_reply(reader, timeout)
        return
    result.unanswered.append(seq)
    writer.writelines((head, run.body, b".\r\n"))
    result.sent_bytes += size
    try:
        await asyncio.wait_for(writer.drain(), timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise SmtpFailure(f"sending DATA: {error!r}") from error
    code = (await _read_reply(reader, timeout))[0]
    result.unanswered.remove(seq)
    if code == 250:
        result.accepted.append((seq, started, time.monotonic_ns()))
    else:
        result.refused += 1


async def _session(run: _Run) -> None:
    spec, result = run.spec, run.result
    while not run.over:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(spec.host, spec.port), timeout=spec.reply_timeout
            )
        except (OSError, TimeoutError):
            result.errors += 1
            await asyncio.sleep(0.2)
            continue
        result.sessions_opened += 1
        try:
            code, _ = await _read_reply(reader, spec.reply_timeout)
            if code != 220:
                raise SmtpFailure(f"greeted with {code}")
            writer.write(b"EHLO loadgen.bench.test\r\n")
            code, text = await _read_reply(reader, spec.reply_timeout)
            if code != 250:
                raise SmtpFailure(f"EHLO answered {code}")
            pipelining = "PIPELINING" in text.upper().split("\n")
            for _ in range(spec.per_session):
                seq = run.take()
                if seq is None:
                    break
                await _transaction(run, reader, writer, seq, pipelining)
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(SmtpFailure):
                await _read_reply(reader, spec.reply_timeout)
        except SmtpFailure:
            result.errors += 1
            await asyncio.sleep(0.2)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), timeout=5)


async def run_load(spec: LoadSpec) -> LoadResult:
    """Run the load until the deadline or the message count, whichever comes first."""
    result = LoadResult(tag=spec.tag)
    run = _Run(spec, result)
    result.started_ns = time.monotonic_ns()
    await asyncio.gather(*(_session(run) for _ in range(spec.sessions)))
    result.ended_ns = time.monotonic_ns()
    return result
