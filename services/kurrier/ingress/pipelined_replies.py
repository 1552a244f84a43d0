"""Replies to pipelined commands, written together.

A client that pipelines (RFC 2920) sends MAIL, RCPT and DATA in one packet;
answering each on its own costs a write per reply on both ends. RFC 2920 3.2
lets the server hold replies while more input is buffered, as long as it
sends everything it holds once its input buffer is empty: Postfix's smtpd
does the same. Only plain success replies are held; a greeting or TLS go-ahead
(220), a goodbye (221), anything that asks for more input (3xx) and every
error go out at once, with whatever was held before them.
"""

from __future__ import annotations

import asyncio

HELD_CODES = (b"250", b"251", b"252")


class PipelinedReplies:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._held: list[bytes] = []

    def _next_command_waiting(self) -> bool:
        # asyncio's StreamReader has no public peek; its buffer is the input
        # the next readuntil() will be served from.
        buffered = getattr(self._reader, "_buffer", None)
        return buffered is not None and b"\n" in buffered

    async def send(self, reply: bytes) -> None:
        """Send reply (without its CRLF), or hold it while the next command is already here."""
        self._held.append(reply + b"\r\n")
        if reply[:3] in HELD_CODES and self._next_command_waiting():
            return
        self._writer.write(self.take_held())
        await self._writer.drain()

    def take_held(self) -> bytes:
        """Every held reply, in order, for a write that must include them (a goodbye)."""
        held = b"".join(self._held)
        self._held.clear()
        return held
