"""Replies to a pipeline are held while its next command is buffered, and sent together."""

from __future__ import annotations

import asyncio
import socket

from kurrier.ingress.pipelined_replies import PipelinedReplies


def _received(peer: socket.socket) -> bytes:
    """What the peer can read right now, without waiting."""
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


async def _exchange() -> list[bytes]:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=ours)
    replies = PipelinedReplies(reader, writer)
    seen = []
    # The client pipelined MAIL, RCPT and DATA; the server has read MAIL.
    peer.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\n")
    await reader.readuntil(b"\r\n")
    await replies.send(b"250 2.1.0 OK")
    seen.append(_received(peer))  # held: RCPT is waiting
    await reader.readuntil(b"\r\n")
    await replies.send(b"250 2.1.5 OK")
    seen.append(_received(peer))  # held: DATA is waiting
    await reader.readuntil(b"\r\n")
    await replies.send(b"354 End data with <CR><LF>.<CR><LF>")
    seen.append(_received(peer))  # 354 asks for input: everything goes, in order
    # An error is never held, even with a command waiting behind it.
    peer.send(b"RCPT TO:<x@y.test>\r\nNOOP\r\n")
    await reader.readuntil(b"\r\n")
    await replies.send(b"550 5.1.1 no")
    seen.append(_received(peer))
    # Nothing buffered behind it: a 250 goes at once.
    await reader.readuntil(b"\r\n")
    await replies.send(b"250 2.0.0 OK")
    seen.append(_received(peer))
    writer.close()
    peer.close()
    return seen


def test_pipelined_success_replies_go_out_together_and_errors_at_once() -> None:
    assert asyncio.run(_exchange()) == [
        b"",
        b"",
        b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
        b"550 5.1.1 no\r\n",
        b"250 2.0.0 OK\r\n",
    ]


async def _goodbye_with_held() -> tuple[bytes, bytes]:
    ours, peer = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    replies = PipelinedReplies(reader, writer)
    peer.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    await reader.readuntil(b"\r\n")
    await replies.send(b"250 2.1.0 OK")
    held = replies.take_held()
    writer.close()
    peer.close()
    return held, replies.take_held()


def test_a_goodbye_takes_what_was_held_once() -> None:
    assert asyncio.run(_goodbye_with_held()) == (b"250 2.1.0 OK\r\n", b"")
