"""Property-based fuzzing of the DATA reader against a slow, obviously right reference."""

from __future__ import annotations

import asyncio
import re

from hypothesis import given
from hypothesis import strategies as st
from kurrier.delivery.smtp_client import to_wire_body
from kurrier.ingress.data_reader import LINE_TOO_LONG, DataLimits, DataReader
from kurrier.ingress.data_stream import read_data
from kurrier.ingress.line_endings import has_bare_line_end

# Bytes that matter to the reader, mixed with a few ordinary ones.
_INTERESTING = st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"\r\n.", b".\r\n", b"x", b"\x00"])
WIRE = st.lists(st.one_of(_INTERESTING, st.binary(max_size=8)), max_size=200).map(b"".join)
NO_LIMITS = DataLimits(
    max_size=10**9, max_line_length=10**9, max_header_size=10**9, max_headers=10**9, max_hops=10**9
)


def reference(wire: bytes) -> tuple[int, bytes] | None:
    """(octets of DATA, stored message) by the book, or None if the data never ends."""
    end = (b"\r\n" + wire).find(b"\r\n.\r\n")
    if end < 0:
        return None
    body = wire[:end]  # its last line ends with the terminator's CRLF
    lines = body[:-2].split(b"\r\n") if body else []
    stored = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return end + 3, re.sub(rb"\r(?!\n)|(?<!\r)\n", b"\r\n", stored)


def feed_in_chunks(wire: bytes, cuts: list[int], limits: DataLimits) -> tuple[int, DataReader]:
    reader = DataReader(limits)
    consumed, start = 0, 0
    for cut in [*sorted(cuts), len(wire)]:
        consumed += reader.feed(wire[start:cut])
        start = cut
    return consumed, reader


@given(wire=WIRE)
def test_a_bare_line_end_is_found_exactly_where_the_reference_finds_one(wire: bytes) -> None:
    assert has_bare_line_end(wire) == bool(re.search(rb"\r(?!\n)|(?<!\r)\n", wire))


@given(wire=WIRE, tail=st.binary(max_size=20), cuts=st.lists(st.integers(0, 400), max_size=20))
def test_reader_matches_the_reference(wire: bytes, tail: bytes, cuts: list[int]) -> None:
    data = wire + b"\r\n.\r\n" + tail
    consumed, reader = feed_in_chunks(data, [c for c in cuts if c <= len(data)], NO_LIMITS)
    expected = reference(data)
    assert expected is not None
    assert reader.done and reader.refusal is None
    assert (consumed, reader.content()) == expected


async def read_from_stream(wire: bytes, cuts: list[int], limit: int) -> tuple[bool, bytes, bytes]:
    """(ended, stored message, what the stream still holds) after read_data() on a
    stream that gets wire in pieces cut at cuts, then its end."""
    stream = asyncio.StreamReader(limit=limit)
    reader = DataReader(NO_LIMITS)
    reading = asyncio.create_task(read_data(stream, reader))
    start = 0
    for cut in [*sorted(cuts), len(wire)]:
        stream.feed_data(wire[start:cut])
        start = cut
        await asyncio.sleep(0)  # a turn for the reader: it sees the pieces as they come
    stream.feed_eof()
    ended = await reading
    return ended, reader.content(), await stream.read()


@given(
    wire=WIRE,
    tail=st.binary(max_size=20),
    cuts=st.lists(st.integers(0, 400), max_size=20),
    limit=st.integers(6, 80),
)
def test_the_stream_is_read_to_the_end_of_data_and_no_further(
    wire: bytes, tail: bytes, cuts: list[int], limit: int
) -> None:
    """What follows the end of data (the next command) stays in the stream, and the
    reads never wait for octets that need not come, wherever the pieces are cut and
    whatever the stream's limit (asyncio's LimitOverrunError path)."""
    data = wire + b"\r\n.\r\n" + tail
    expected = reference(data)
    assert expected is not None
    ended, stored, left = asyncio.run(read_from_stream(data, cuts, limit))
    assert ended
    assert (stored, left) == (expected[1], data[expected[0] :])


@given(wire=WIRE, cuts=st.lists(st.integers(0, 400), max_size=20), limit=st.integers(6, 80))
def test_a_stream_that_ends_without_the_terminator_is_a_client_gone(
    wire: bytes, cuts: list[int], limit: int
) -> None:
    if reference(wire) is not None:
        return
    ended, _, left = asyncio.run(read_from_stream(wire, cuts, limit))
    assert not ended and left == b""


@given(wire=WIRE, cuts=st.lists(st.integers(0, 400), max_size=20))
def test_unterminated_data_never_ends(wire: bytes, cuts: list[int]) -> None:
    if reference(wire) is not None:
        return
    consumed, reader = feed_in_chunks(wire, [c for c in cuts if c <= len(wire)], NO_LIMITS)
    assert not reader.done and consumed == len(wire)


@given(
    lines=st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))),
)
def test_dot_stuffing_round_trips(lines: list[bytes]) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    consumed, reader = feed_in_chunks(stuffed + b".\r\nNEXT", [], NO_LIMITS)
    assert reader.content() == message
    assert consumed == len(stuffed) + 3


@given(
    wire=WIRE,
    size=st.integers(1, 300),
    line=st.integers(3, 50),
    cuts=st.lists(st.integers(0, 400), max_size=20),
)
def test_limits_hold_whatever_comes(wire: bytes, size: int, line: int, cuts: list[int]) -> None:
    limits = DataLimits(max_size=size, max_line_length=line, max_header_size=64, max_headers=5)
    data = wire + b"\r\n.\r\n"
    _, reader = feed_in_chunks(data, [c for c in cuts if c <= len(data)], limits)
    assert reader.done
    content = reader.content()
    assert len(content) <= size
    if reader.refusal is None:
        assert all(len(x) + 2 <= line for x in to_wire_body(content).split(b"\r\n"))
    else:
        assert content == b"" and reader.refusal[:3] in ("552", "554")


# Lines near a short limit, with the dots and bare line ends that move them across it.
_NEAR = st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n.", b"\n.", b"\r.", b".", b"..", b"x" * 5])
NEAR_LIMIT = st.lists(st.one_of(_NEAR, st.binary(max_size=8)), max_size=60).map(b"".join)


@given(
    wire=st.one_of(WIRE, NEAR_LIMIT),
    line=st.integers(3, 50),
    cuts=st.lists(st.integers(0, 400), max_size=20),
)
def test_a_line_is_refused_exactly_when_it_goes_out_too_long(
    wire: bytes, line: int, cuts: list[int]
) -> None:
    """RFC 5321 4.5.3.1.6 on the message as delivery sends it: normalised, dot-stuffed."""
    data = wire + b"\r\n.\r\n"
    expected = reference(data)
    assert expected is not None
    sent = to_wire_body(expected[1]).split(b"\r\n")
    limits = DataLimits(max_size=10**9, max_line_length=line, max_header_size=10**9)
    _, reader = feed_in_chunks(data, [c for c in cuts if c <= len(data)], limits)
    assert reader.done
    too_long = LINE_TOO_LONG.format(limit=line)
    assert (reader.refusal == too_long) == any(len(x) + 2 > line for x in sent)


def chunked_reference(wire: bytes) -> bytes:
    """The message BDAT chunks holding wire make, by the book: nothing unstuffed or
    ended inside, line ends made CRLF, and a last line without one given a CRLF."""
    stored = re.sub(rb"\r(?!\n)|(?<!\r)\n", b"\r\n", wire)
    return stored if stored.endswith(b"\r\n") or not stored else stored + b"\r\n"


def take_in_chunks(wire: bytes, cuts: list[int], limits: DataLimits) -> DataReader:
    reader = DataReader(limits)
    start = 0
    for cut in [*sorted(c for c in cuts if c <= len(wire)), len(wire)]:
        reader.take(wire[start:cut])
        start = cut
    reader.finish()
    return reader


@given(wire=WIRE, cuts=st.lists(st.integers(0, 400), max_size=20))
def test_chunks_make_the_reference_message_wherever_they_are_cut(
    wire: bytes, cuts: list[int]
) -> None:
    reader = take_in_chunks(wire, cuts, NO_LIMITS)
    assert reader.done and reader.refusal is None
    assert reader.content() == chunked_reference(wire)


@given(
    wire=st.one_of(WIRE, NEAR_LIMIT),
    line=st.integers(3, 50),
    cuts=st.lists(st.integers(0, 400), max_size=20),
)
def test_a_chunked_line_is_refused_exactly_when_it_goes_out_too_long(
    wire: bytes, line: int, cuts: list[int]
) -> None:
    sent = to_wire_body(chunked_reference(wire)).split(b"\r\n")
    limits = DataLimits(max_size=10**9, max_line_length=line, max_header_size=10**9)
    reader = take_in_chunks(wire, cuts, limits)
    too_long = LINE_TOO_LONG.format(limit=line)
    assert (reader.refusal == too_long) == any(len(x) + 2 > line for x in sent)
