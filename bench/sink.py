"""A fast counting SMTP sink: the next hop of both relays under test.

It speaks just enough ESMTP for a relay's client (EHLO, PIPELINING, SIZE,
8BITMIME, CHUNKING, MAIL, RCPT, DATA, BDAT, RSET, NOOP, QUIT), as a real next
hop would (Postfix's smtpd offers CHUNKING too; its smtp client never uses
it), keeps nothing on disk, and for
each message records only what the benchmark needs: the message's bench id
(`X-Bench-Id: TAG-SEQ`), its arrival time and the send time stamped into it
(`X-Bench-T:`, CLOCK_MONOTONIC nanoseconds, comparable across processes on one
machine). A message seen twice is counted as a duplicate, never twice.

Run alone, `python -m bench.sink --listen 127.0.0.1:PORT`, it is driven by
one-line commands on stdin, answered on stdout (see `SinkControl`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from bench.loop import install_fast_loop

ID_HEADER = b"\r\nX-Bench-Id: "
TIME_HEADER = b"\r\nX-Bench-T: "
END_OF_DATA = b"\r\n.\r\n"
HEADER_SCAN = 8192
MAX_LINE = 4096

EHLO_REPLY = (
    b"250-bench-sink\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 104857600\r\n"
    b"250-8BITMIME\r\n"
    b"250-CHUNKING\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 SMTPUTF8\r\n"
)


@dataclass
class TagStats:
    """What arrived for one tag: seq -> (arrival ns, stamped send ns)."""

    arrivals: dict[int, tuple[int, int]] = field(default_factory=dict)
    duplicates: int = 0


@dataclass
class Ledger:
    tags: dict[str, TagStats] = field(default_factory=dict)
    messages: int = 0
    bytes: int = 0
    untagged: int = 0

    def record(self, buffer: bytearray, length: int, arrived: int) -> None:
        """Account for the message in buffer[:length] (which starts with CRLF)."""
        self.messages += 1
        self.bytes += length
        head = bytes(buffer[: min(length, HEADER_SCAN)])
        start = head.find(ID_HEADER)
        if start < 0:
            self.untagged += 1
            return
        start += len(ID_HEADER)
        end = head.find(b"\r\n", start)
        tag, _, seq_text = head[start:end].decode("ascii", "replace").rpartition("-")
        stamp = 0
        t_start = head.find(TIME_HEADER)
        if t_start >= 0:
            t_start += len(TIME_HEADER)
            with contextlib.suppress(ValueError):
                stamp = int(head[t_start : head.find(b"\r\n", t_start)])
        try:
            seq = int(seq_text)
        except ValueError:
            self.untagged += 1
            return
        stats = self.tags.get(tag)
        if stats is None:
            stats = self.tags[tag] = TagStats()
        if seq in stats.arrivals:
            stats.duplicates += 1
        else:
            stats.arrivals[seq] = (arrived, stamp)


class SinkProtocol(asyncio.Protocol):
    """One SMTP session; commands may be pipelined, replies go out in one write per read."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._in_data = False
        self._scan_from = 0
        # BDAT: octets of the current chunk still to come, whether it is the
        # last, and the message so far (after a CRLF, as Ledger.record wants).
        self._chunk_left: int | None = None
        self._chunk_last = False
        self._message = bytearray(b"\r\n")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(b"220 bench-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        closing = False
        while True:
            if self._chunk_left is not None:
                taken = min(self._chunk_left, len(buffer))
                self._message += buffer[:taken]
                del buffer[:taken]
                self._chunk_left -= taken
                if self._chunk_left:
                    break
                self._chunk_left = None
                if self._chunk_last:
                    message = self._message
                    self._ledger.record(message, len(message), time.monotonic_ns())
                    self._message = bytearray(b"\r\n")
                out.append(b"250 2.0.0 Ok\r\n")
                continue
            if not buffer:
                break
            if self._in_data:
                end = buffer.find(END_OF_DATA, self._scan_from)
                if end < 0:
                    self._scan_from = max(0, len(buffer) - len(END_OF_DATA) + 1)
                    break
                # buffer starts with a CRLF we put there: the message is between.
                self._ledger.record(buffer, end + 2, time.monotonic_ns())
                del buffer[: end + len(END_OF_DATA)]
                self._in_data = False
                out.append(b"250 2.0.0 Ok\r\n")
                continue
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) > MAX_LINE:
                    out.append(b"500 5.5.2 Line too long\r\n")
                    closing = True
                break
            line = bytes(buffer[:newline]).rstrip(b"\r")
            del buffer[: newline + 1]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(EHLO_REPLY)
            elif verb == b"HELO":
                out.append(b"250 bench-sink\r\n")
            elif verb == b"MAIL":
                out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self._in_data = True
                buffer[:0] = b"\r\n"
                self._scan_from = 0
            elif verb == b"BDAT":
                words = line.split()
                last = [word.upper() for word in words[2:]] == [b"LAST"]
                if len(words) not in (2, 3) or not words[1].isdigit() or (words[2:] and not last):
                    out.append(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")
                    continue
                self._chunk_left = int(words[1])
                self._chunk_last = last
            elif verb in (b"RSET", b"NOOP"):
                self._message = bytearray(b"\r\n")
                out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                closing = True
                break
            else:
                out.append(b"502 5.5.2 Command not implemented\r\n")
        if out and self._transport is not None:
            self._transport.write(b"".join(out))
        if closing and self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def start_sink(host: str, port: int, ledger: Ledger) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SinkProtocol(ledger), host, port, reuse_address=True, backlog=1024
    )


def handle_command(ledger: Ledger, line: str) -> str:
    """The control protocol, one command a line:

    COUNT TAG        -> OK UNIQUE DUPLICATES
    DUMP TAG PATH    -> OK UNIQUE   (writes {"arrivals": {seq: [arrived, stamped]}, ...})
    STATS            -> OK {"tag": [unique, duplicates], ...} plus totals
    QUIT             -> OK, and the sink exits
    """
    words = line.split()
    if not words:
        return "ERR empty command"
    command = words[0].upper()
    if command == "COUNT" and len(words) == 2:
        stats = ledger.tags.get(words[1], TagStats())
        return f"OK {len(stats.arrivals)} {stats.duplicates}"
    if command == "DUMP" and len(words) == 3:
        stats = ledger.tags.get(words[1], TagStats())
        document = {
            "arrivals": {str(seq): list(times) for seq, times in stats.arrivals.items()},
            "duplicates": stats.duplicates,
        }
        with open(words[2], "w", encoding="utf-8") as file:
            json.dump(document, file)
        return f"OK {len(stats.arrivals)}"
    if command == "STATS":
        summary: dict[str, object] = {
            tag: [len(s.arrivals), s.duplicates] for tag, s in ledger.tags.items()
        }
        summary["_messages"] = ledger.messages
        summary["_bytes"] = ledger.bytes
        summary["_untagged"] = ledger.untagged
        return "OK " + json.dumps(summary)
    if command == "QUIT":
        return "OK"
    return f"ERR unknown command {line.strip()!r}"


async def serve_with_control(host: str, port: int) -> None:
    ledger = Ledger()
    server = await start_sink(host, port, ledger)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(f"READY {host}:{server.sockets[0].getsockname()[1]}", flush=True)
    try:
        while True:
            raw = await reader.readline()
            if not raw:
                return
            answer = handle_command(ledger, raw.decode())
            print(answer, flush=True)
            if raw.strip().upper() == b"QUIT":
                return
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: any)")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    install_fast_loop()
    asyncio.run(serve_with_control(host or "127.0.0.1", int(port)))


if __name__ == "__main__":
    main()


class SinkProcess:
    """The sink as a child process of the benchmark, driven over its stdin/stdout."""

    def __init__(self, process: asyncio.subprocess.Process, host: str, port: int) -> None:
        self.process = process
        self.host = host
        self.port = port
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, host: str = "127.0.0.1", port: int = 0) -> SinkProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.sink",
            "--listen",
            f"{host}:{port}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
        if not line.startswith(b"READY "):
            raise RuntimeError(f"the sink did not start: {line!r}")
        bound = line.split()[1].decode()
        return cls(process, host, int(bound.rpartition(":")[2]))

    async def command(self, line: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        async with self._lock:
            self.process.stdin.write(line.encode() + b"\n")
            await self.process.stdin.drain()
            answer = (await asyncio.wait_for(self.process.stdout.readline(), timeout=60)).decode()
        if not answer.startswith("OK"):
            raise RuntimeError(f"sink: {line!r} -> {answer!r}")
        return answer[2:].strip()

    async def count(self, tag: str) -> tuple[int, int]:
        unique, duplicates = (await self.command(f"COUNT {tag}")).split()
        return int(unique), int(duplicates)

    async def dump(self, tag: str, path: str) -> dict[str, object]:
        await self.command(f"DUMP {tag} {path}")
        text = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
        document: dict[str, object] = json.loads(text)
        return document

    async def stats(self) -> dict[str, object]:
        document: dict[str, object] = json.loads(await self.command("STATS"))
        return document

    async def stop(self) -> None:
        with contextlib.suppress(RuntimeError, OSError, TimeoutError):
            await self.command("QUIT")
        try:
            await asyncio.wait_for(self.process.wait(), timeout=10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
