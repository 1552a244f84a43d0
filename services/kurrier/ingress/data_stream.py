"""Reading DATA off a session's stream: in blocks, and never past the end of data.

What follows the end of data is the client's next command (pipelined), so
the stream must stop at <CRLF>.<CRLF>. Reading up to the first ".<CRLF>"
would do that, but it stops at every line ending in a full stop: a page of
prose comes in a read per sentence, several times the CPU of the whole rest
of its relaying, and a cheap way for a client to load ingress. So the stream
is read up to the whole terminator, which only the end of data matches.

That alone could wait for ever when the octets already read end with the
start of the terminator (the CRLF of the DATA command itself, before an empty
message's "."; or a read that stopped after "<CRLF>."): its rest may be all
that is left. Then exactly the octets that could finish it are read (at most
four), which can never go past it: a terminator finishing within them must
start within what was read.
"""

from __future__ import annotations

import asyncio

from kurrier.ingress.data_reader import TERMINATOR, DataReader


async def read_data(stream: asyncio.StreamReader, reader: DataReader) -> bool:
    """Feed reader until it is done; False if the client went away first."""
    while not reader.done:
        started = reader.terminator_started()
        try:
            if started:
                chunk = await stream.readexactly(len(TERMINATOR) - started)
            else:
                chunk = await stream.readuntil(TERMINATOR)
        except asyncio.LimitOverrunError as error:
            # A block of the stream's limit with no terminator in it; the end
            # of the buffer, which may hold its start, stays for the next read.
            chunk = await stream.read(error.consumed)
        except asyncio.IncompleteReadError:
            return False
        reader.feed(chunk)
    return True
