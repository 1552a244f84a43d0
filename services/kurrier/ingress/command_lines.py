"""Command lines end in CRLF, and in nothing else (RFC 5321 2.3.8).

aiosmtpd reads a command up to the first LF and strips any CRs and LFs from its
end, so "MAIL FROM:<a@b>\\n" runs like "MAIL FROM:<a@b>\\r\\n", and a bare CR
inside a line stays in it. A peer in front of ingress (a proxy, a filter,
another MTA) that splits lines differently sees other commands than ingress
does; this is the command-phase sibling of SMTP smuggling. Like Postfix's
smtpd_forbid_bare_newline, such a line is refused and never carried out.

aiosmtpd has no hook between reading a line and running it, so the reader it
is given hands back, in place of such a line, a command no client can send:
its name holds an LF, and every line aiosmtpd reads ends at its first LF. The
session runs that command as the refusal. The client's answers to AUTH's 334
challenges (aiosmtpd reads them with readline()) follow the same rule: such
an answer raises BareNewline, and the session refuses the exchange. The DATA
reader's reads (readuntil() with a separator) pass through untouched.
"""

from __future__ import annotations

import asyncio
from typing import Any

# The name of the command that stands in for a refused line (never on the wire).
BARE_NEWLINE_COMMAND = "\nBARE-NEWLINE"
BARE_NEWLINE = (
    "500 5.5.2 Error: bare <{kind}> received; command lines end with <CR><LF> (RFC 5321 2.3.8)"
)


def bare_newline(line: bytes) -> str | None:
    """'LF' or 'CR' if line (read up to its LF) holds either other than in its final CRLF."""
    if not line.endswith(b"\r\n") and line.endswith(b"\n"):
        return "LF"
    if line.count(b"\r") > line.endswith(b"\r\n"):
        return "CR"
    return None


class BareNewline(Exception):
    """An AUTH answer ending in a bare LF or holding a bare CR; kind is 'LF' or 'CR'."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class CommandLineReader(asyncio.StreamReader):
    async def readuntil(self, separator: Any = None) -> bytes:
        """aiosmtpd reads each command with readuntil(); every other read names a separator."""
        if separator is not None:  # DATA, and readline() below
            return await super().readuntil(separator)
        line = await super().readuntil(b"\n")
        kind = bare_newline(line)
        if kind is None:
            return line
        return f"{BARE_NEWLINE_COMMAND} {kind}\r\n".encode()

    async def readline(self) -> bytes:
        """aiosmtpd reads only AUTH's answers to 334 with readline()."""
        line = await super().readline()
        kind = bare_newline(line)
        if kind is not None:
            raise BareNewline(kind)
        return line


class CommandLineProtocol(asyncio.StreamReaderProtocol):
    """Gives aiosmtpd's SMTP (which makes a plain StreamReader) a CommandLineReader.

    Placed after SMTP among a session's bases, it receives the reader SMTP
    passes to StreamReaderProtocol and puts its own, with the same limit, there.
    """

    line_length_limit: int

    def __init__(
        self,
        stream_reader: asyncio.StreamReader | None,
        client_connected_cb: object = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        reader = CommandLineReader(limit=self.line_length_limit, loop=loop)
        super().__init__(reader, client_connected_cb, loop)  # type: ignore[arg-type]
