"""The benchmark's own tools, so they cannot rot unnoticed: the load generator
against the fast sink on loopback, and the sink's accounting of duplicates."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.loadgen import LoadSpec, message_head, run_load
from bench.sink import Ledger, SinkProcess


async def test_load_generator_and_sink_agree(tmp_path: Path) -> None:
    sink = await SinkProcess.start()
    try:
        spec = LoadSpec(
            host="127.0.0.1",
            port=sink.port,
            tag="smoke",
            sessions=4,
            size=2048,
            duration=30.0,
            max_messages=200,
            per_session=15,  # several reconnects per session
            reply_timeout=10.0,
        )
        result = await asyncio.wait_for(run_load(spec), timeout=60)
        assert len(result.accepted) == 200
        assert result.refused == result.errors == 0
        assert result.unanswered == []
        assert result.sessions_opened >= 200 // 15
        unique, duplicates = await sink.count("smoke")
        assert (unique, duplicates) == (200, 0)
        dump = await sink.dump("smoke", str(tmp_path / "arrivals.json"))
        arrivals = dump["arrivals"]
        assert isinstance(arrivals, dict)
        assert {int(seq) for seq in arrivals} == {seq for seq, _, _ in result.accepted}
        started = {seq: start for seq, start, _ in result.accepted}
        for seq, (arrived, stamped) in arrivals.items():
            assert stamped == started[int(seq)]  # the send time stamped into the message
            assert arrived >= stamped
        assert (await sink.count("other")) == (0, 0)
    finally:
        await sink.stop()
    assert sink.process.returncode == 0


async def test_sink_takes_bdat_chunks_pipelined_with_the_envelope() -> None:
    sink = await SinkProcess.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        message = message_head("bdat", 1, 5) + b".a line DATA would stuff\r\n"
        first, rest = message[:40], message[40:]
        writer.write(
            b"EHLO relay\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n"
            + b"BDAT %d\r\n%s" % (len(first), first)
            + b"BDAT %d LAST\r\n%s" % (len(rest), rest)
            + b"BDAT x\r\nQUIT\r\n"
        )
        replies = (await asyncio.wait_for(reader.read(), timeout=10)).decode().splitlines()
        writer.close()
        assert "250-CHUNKING" in replies
        assert replies[-6:] == [
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.0.0 Ok",  # the first chunk
            "250 2.0.0 Ok",  # the last: the message
            "501 5.5.4 Syntax: BDAT size [LAST]",
            "221 2.0.0 Bye",
        ]
        assert (await sink.count("bdat")) == (1, 0)
    finally:
        await sink.stop()


def test_ledger_counts_a_message_seen_twice_once() -> None:
    ledger = Ledger()
    message = bytearray(b"\r\n" + message_head("dup", 7, 123) + b"body\r\n")
    for _ in range(3):
        ledger.record(message, len(message), arrived=456)
    stats = ledger.tags["dup"]
    assert stats.arrivals == {7: (456, 123)}
    assert stats.duplicates == 2
    assert ledger.messages == 3

    ledger.record(bytearray(b"\r\nSubject: no id\r\n\r\n"), 20, arrived=1)
    assert ledger.untagged == 1
