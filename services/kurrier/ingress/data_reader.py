"""The DATA phase as a pure state machine: raw bytes in, a bounded message or a refusal out.

aiosmtpd's own DATA loop keeps every fragment of an over-long line until the
line ends, so one endless line grows without bound. This reader never holds
more than the message size limit plus the chunk it is given; past any limit it
drops what it has and only looks for the end of the data.

End of data is only <CRLF>.<CRLF> (RFC 5321 4.1.1.4): a bare LF or CR before
or after the dot never ends it (SMTP smuggling, Dec 2023). Lines are
dot-unstuffed (RFC 5321 4.5.2), then every bare CR or LF left inside becomes
CRLF, so the stored message has one meaning for every next hop.

Lines are measured as delivery will send them, since a next hop that refuses
a line makes the queue bounce the message to whatever MAIL FROM the client
gave (backscatter): after that normalisation, and with the dot that
delivery's dot-stuffing puts before a line starting with "." (it may send by
DATA even when the next hop offers BDAT). A bare LF can turn the tail of a
line into a line of its own, and nothing after a bare LF is unstuffed, so a
run that came with a transparency dot may go out with one too.

BDAT chunks (RFC 3030) go through the same judgements with take(): their
octets are the message as sent, so nothing is unstuffed and nothing in them
ends the data; finish() ends it at BDAT LAST.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kurrier.ingress.line_endings import has_bare_line_end, normalise_line_endings

TERMINATOR = b"\r\n.\r\n"
# What both the terminator and a dot-stuffed line start with.
_LINE_START_DOT = b"\r\n."

TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
LINE_TOO_LONG = (
    "552 5.6.0 Message has a line longer than {limit} octets as sent, CRLF included"
    " (RFC 5321 4.5.3.1.6)"
)
HEADER_TOO_BIG = "552 5.6.0 Message header section larger than {limit} octets"
TOO_MANY_HEADERS = "552 5.6.0 Message has more than {limit} header fields"
TOO_MANY_HOPS = "554 5.4.6 Too many Received headers (more than {limit}): mail loop?"

_NEWLINE_OCTETS = b"\r\n"
_RECEIVED = re.compile(rb"received[ \t]*:", re.IGNORECASE)


@dataclass(frozen=True)
class DataLimits:
    max_size: int
    # Octets per line as delivery sends it: CRLF and any transparency dot included.
    max_line_length: int = 1000
    max_header_size: int = 256 * 1024
    max_headers: int = 1000
    max_hops: int = 50


class DataReader:
    """Feed it the bytes after `354`, or take() the octets of BDAT chunks; never both."""

    def __init__(self, limits: DataLimits) -> None:
        self._limits = limits
        # The last two octets taken into the message; the CRLF of the DATA command
        # starts it off, so "." right away ends an empty message.
        self._before = b"\r\n"
        # Octets received but not yet taken: they may be the start of the terminator.
        self._held = b""
        self._partial = bytearray()  # raw octets of the line not yet ended by CRLF
        self._run = 0  # length of the trailing run of octets without CR or LF
        # A bare CR or LF has come, so stored lines need normalising; and whether the
        # octets taken so far end in a CR that the next octet may pair with.
        self._bare = False
        self._after_cr = False
        # A line starting with "." has come, so stored lines need unstuffing.
        self._dotted = False
        # A run near the line length limit has come: stored lines need measuring.
        self._near_limit = False
        self._parts: list[bytes] = []
        self._size = 0
        self._in_headers = True
        self._header_bytes = 0
        self._headers = 0
        self._hops = 0
        self.done = False
        self.refusal: str | None = None

    def feed(self, data: bytes) -> int:
        """Take data; returns how many octets were DATA (fewer only at the end)."""
        if self.done or not data:
            return 0
        window = self._held + data
        search = self._before + window
        end = self._find_end(search)
        if end >= 0:
            # The terminator's CRLF ends the last line of the message.
            self._take(search[len(self._before) : end + 2])
            self.done = True
            return end + len(TERMINATOR) - len(self._before) - len(self._held)
        keep = min(len(TERMINATOR) - 1, len(window))
        taken = window[: len(window) - keep]
        self._take(taken)
        self._before = (self._before + taken[-2:])[-2:]
        self._held = window[len(window) - keep :]
        return len(data)

    def terminator_started(self) -> int:
        """How many octets of the terminator (0-4) the octets fed so far end with:
        its rest may be all the client has left to send."""
        tail = self._before + self._held
        for length in range(len(TERMINATOR) - 1, 0, -1):
            if tail.endswith(TERMINATOR[:length]):
                return length
        return 0

    def take(self, chunk: bytes) -> None:
        """Take octets of a BDAT chunk: message octets as they are, whatever they hold."""
        if not self.done:
            self._take(chunk)

    def finish(self) -> None:
        """End a chunked message (BDAT LAST). A last line without a line end gets a
        CRLF, since delivery by DATA can only end data after a CRLF."""
        if self._after_cr:
            self._take(b"\n")  # the CR that ended the chunk was bare
        elif self._partial and not self._partial.endswith(b"\n"):
            self._take(_NEWLINE_OCTETS)
        if self._partial and not self.refusal:
            # Its CRLF came in two takes, or it ends in a bare LF: a whole line.
            self._store(bytes(self._partial))
            self._partial.clear()
        self.done = True

    def _find_end(self, search: bytes) -> int:
        """Where the terminator starts in search, or -1; notes a dot-stuffed line.

        One scan for CRLF "." usually settles both: most messages have no line
        starting with ".", and then neither the terminator search nor the
        unstuffing of every stored line is needed. (A match that turns out to
        be the start of the terminator only once more octets come sets the
        flag needlessly, which costs an unstuffing pass, nothing else.)
        """
        at = search.find(_LINE_START_DOT)
        if at < 0:
            return -1
        end = search.find(TERMINATOR, at)
        if end != at:
            self._dotted = True
        return end

    def content(self) -> bytes:
        """The message as stored: unstuffed, CRLF line endings only."""
        return b"".join(self._parts)

    def _refuse(self, reply: str) -> None:
        self.refusal = reply
        self._parts.clear()
        self._partial.clear()

    def _take(self, raw: bytes) -> None:
        if self.refusal or not raw:
            return  # past a limit only the terminator matters
        self._scan(raw)
        if self.refusal:
            return
        # Whole lines are stored up to the last CRLF in raw, cut without first
        # joining raw to the partial line. (A CRLF straddling the two only
        # waits for the next CRLF to be stored.)
        cut = raw.rfind(b"\r\n")
        if cut < 0:
            self._partial += raw
        else:
            complete = b"".join((self._partial, memoryview(raw)[: cut + 2]))
            self._partial = bytearray(memoryview(raw)[cut + 2 :])
            self._store(complete)
        if not self.refusal and self._size + len(self._partial) > self._limits.max_size:
            self._refuse(TOO_BIG)

    def _scan(self, raw: bytes) -> None:
        """Measure the runs between line-ending octets against the line length
        limit, and note any bare CR or LF. Contiguous with what came before.

        Each run is one stored line, sent with at most one dot more or less than
        it came with: a run of the limit or more is refused here, before it is
        held; one within two octets of it has its line measured when stored.
        A CR ending raw may pair with an LF starting the next, so it is left
        for then.

        Searches that skip ahead in C settle both: splitting a page of prose
        into its lines costs several times as much, so the runs are split only
        when one may be long enough to matter.
        """
        limit = self._limits.max_line_length
        lead_lf = self._after_cr and raw.startswith(b"\n")
        if self._after_cr and not lead_lf:
            self._bare = True  # the CR that ended the previous octets was bare
        tail_cr = raw.endswith(b"\r")
        self._after_cr = tail_cr
        core = raw[lead_lf : len(raw) - tail_cr]
        if not core:
            if tail_cr:
                self._run = 0
            return
        first = _first_line_end(core)
        if first < 0:
            longest = self._run + len(core)  # no break at all: the run goes on
            self._run = 0 if tail_cr else longest
        else:
            longest = self._run + first
            # Runs shorter than this change nothing below.
            near = limit - len(b".") - len(_NEWLINE_OCTETS) + 1
            if longest < limit and _has_run_of(core, near):
                longest = max(longest, max(map(len, core.splitlines())))
            last = max(core.rfind(b"\r"), core.rfind(b"\n"))
            self._run = 0 if tail_cr else len(core) - 1 - last
        if longest >= limit:
            self._refuse(LINE_TOO_LONG.format(limit=limit))
            return
        if longest + len(b".") + len(_NEWLINE_OCTETS) > limit:
            self._near_limit = True
        if not self._bare and has_bare_line_end(core):
            self._bare = True

    def _store(self, complete: bytes) -> None:
        """complete: whole raw lines, starting at a line start and ending with CRLF."""
        text = complete
        if self._dotted:
            text = text[1:] if text.startswith(b".") else text
            text = text.replace(_LINE_START_DOT, b"\r\n")
        if self._bare:
            text = normalise_line_endings(text)
        if self._near_limit:
            self._measure(text)
            if self.refusal:
                return
        if self._in_headers:
            self._count_headers(text)
            if self.refusal:
                return
        self._size += len(text)
        self._parts.append(text)

    def _measure(self, text: bytes) -> None:
        """Refuse if a stored line goes out longer than the limit (RFC 5321 4.5.3.1.6),
        counting the dot delivery stuffs before a line starting with "."."""
        limit = self._limits.max_line_length
        room = limit - len(_NEWLINE_OCTETS)
        for line in text.split(_NEWLINE_OCTETS):
            if len(line) + line.startswith(b".") > room:
                self._refuse(LINE_TOO_LONG.format(limit=limit))
                return

    def _count_headers(self, text: bytes) -> None:
        if text.startswith(b"\r\n"):
            blank = 0
        else:
            found = text.find(b"\r\n\r\n")
            blank = found + 2 if found >= 0 else -1
        section = text if blank < 0 else text[:blank]
        self._in_headers = blank < 0
        self._header_bytes += len(section)
        lines = section.split(b"\r\n")[:-1]
        self._headers += sum(1 for line in lines if line[:1] not in (b" ", b"\t"))
        self._hops += sum(1 for line in lines if _RECEIVED.match(line))
        limits = self._limits
        if self._hops > limits.max_hops:
            self._refuse(TOO_MANY_HOPS.format(limit=limits.max_hops))
        elif self._header_bytes > limits.max_header_size:
            self._refuse(HEADER_TOO_BIG.format(limit=limits.max_header_size))
        elif self._headers > limits.max_headers:
            self._refuse(TOO_MANY_HEADERS.format(limit=limits.max_headers))


def _first_line_end(octets: bytes) -> int:
    """Where the first CR or LF in octets is, or -1."""
    cr, lf = octets.find(b"\r"), octets.find(b"\n")
    return lf if cr < 0 else cr if lf < 0 else min(cr, lf)


def _has_run_of(octets: bytes, length: int) -> bool:
    """Whether octets hold a run of length or more octets without CR or LF.

    From each run's start, the window of the next `length` octets either holds
    a line end, and the next run starts after the last one in it, or is a run
    that long: a handful of searches per window, not one per line.
    """
    start = 0
    while len(octets) - start >= length:
        window_end = start + length
        last = octets.rfind(b"\n", start, window_end)
        if last < 0:
            last = octets.rfind(b"\r", start, window_end)
            if last < 0:
                return True
        start = last + 1
    return False
