"""BatchWriter: what goes out together, what can be taken back, and what a failure reports."""

from __future__ import annotations

import asyncio

import pytest
from kurrier.core.batch_writer import BatchWriter


class Wire:
    """A write that records each batch and, when gated, waits until the test lets it finish."""

    def __init__(self, gated: bool = False, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.failures: list[tuple[list[str], BaseException]] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        if not gated:
            self.gate.set()
        self.fail_on = fail_on

    async def write(self, batch: list[str]) -> None:
        self.started.set()
        await self.gate.wait()
        if self.fail_on in batch:
            raise ConnectionError("wire cut")
        self.batches.append(list(batch))

    def failed(self, unsent: list[str], error: BaseException) -> None:
        self.failures.append((unsent, error))

    def writer(self, limit: int = 0, gather: float = 0.0) -> BatchWriter[str]:
        return BatchWriter(self.write, self.failed, limit, len, gather)

    async def written(self, count: int) -> None:
        """Until count batches are written (at most 5 s: a test that waits longer fails)."""
        async with asyncio.timeout(5):
            while len(self.batches) < count:
                self.started.clear()
                await self.started.wait()
                await asyncio.sleep(0)  # the write that started records its batch


def test_items_added_in_one_turn_go_in_one_write() -> None:
    async def run() -> list[list[str]]:
        wire = Wire()
        writer = wire.writer()
        for item in ("a", "b", "c"):
            assert writer.add(item)
        await writer.close()
        return wire.batches

    assert asyncio.run(run()) == [["a", "b", "c"]]


def test_items_added_during_a_write_go_together_in_the_next() -> None:
    async def run() -> list[list[str]]:
        wire = Wire(gated=True)
        writer = wire.writer()
        writer.add("first")
        await wire.started.wait()
        writer.add("second")
        await asyncio.sleep(0)  # a turn later, still during the same write
        writer.add("third")
        wire.gate.set()
        await writer.close()
        return wire.batches

    assert asyncio.run(run()) == [["first"], ["second", "third"]]


def test_a_batch_stays_within_the_limit_but_an_item_over_it_still_goes() -> None:
    async def run() -> list[list[str]]:
        wire = Wire()
        writer = wire.writer(limit=4)
        for item in ("aa", "bb", "c", "dddddd", "e"):
            writer.add(item)
        await writer.close()
        return wire.batches

    assert asyncio.run(run()) == [["aa", "bb"], ["c"], ["dddddd"], ["e"]]


def test_an_unsent_item_can_be_taken_back_one_being_written_cannot() -> None:
    async def run() -> tuple[bool, bool, bool, list[list[str]]]:
        wire = Wire(gated=True)
        writer = wire.writer()
        sending = "sending"
        waiting = "waiting"
        writer.add(sending)
        await wire.started.wait()
        writer.add(waiting)
        taken = writer.take_back(waiting)
        refused = writer.take_back(sending)
        in_flight = writer.is_being_written(sending)
        wire.gate.set()
        await writer.close()
        return taken, refused, in_flight, wire.batches

    taken, refused, in_flight, batches = asyncio.run(run())
    assert taken and not refused and in_flight
    assert batches == [["sending"]]


def test_a_failed_write_reports_its_batch_and_the_rest_and_refuses_more() -> None:
    async def run() -> tuple[Wire, bool]:
        wire = Wire(gated=True, fail_on="doomed")
        writer = wire.writer()
        writer.add("doomed")
        await wire.started.wait()
        writer.add("after")
        wire.gate.set()
        await writer.close()
        return wire, writer.add("later")

    wire, accepted_later = asyncio.run(run())
    assert wire.batches == []
    [(unsent, error)] = wire.failures
    assert unsent == ["doomed", "after"]
    assert isinstance(error, ConnectionError)
    assert not accepted_later


def test_nothing_is_taken_after_close() -> None:
    async def run() -> tuple[bool, list[list[str]]]:
        wire = Wire()
        writer = wire.writer()
        writer.add("a")
        await writer.close()
        return writer.add("b"), wire.batches

    assert asyncio.run(run()) == (False, [["a"]])


def test_cancel_cuts_a_write_short_and_reports_it() -> None:
    async def run() -> list[list[str]]:
        wire = Wire(gated=True)
        writer = wire.writer()
        writer.add("a")
        await wire.started.wait()
        writer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writer.close()
        [(unsent, error)] = wire.failures
        assert isinstance(error, asyncio.CancelledError)
        return [unsent]

    assert asyncio.run(run()) == [["a"]]


def test_a_gathering_batch_waits_for_as_many_as_the_last_carried() -> None:
    async def run() -> list[list[str]]:
        wire = Wire()
        writer = wire.writer(gather=60)
        for item in ("a", "b", "c"):
            writer.add(item)
        await wire.written(1)
        writer.add("d")
        for _ in range(10):  # turns in which a writer that does not gather would write
            await asyncio.sleep(0)
        writer.add("e")
        await asyncio.sleep(0)
        writer.add("f")
        await wire.written(2)
        await writer.close()
        return wire.batches

    assert asyncio.run(run()) == [["a", "b", "c"], ["d", "e", "f"]]


async def first_then_one_more(gather: float, first: list[str], then: str) -> list[list[str]]:
    """The batches of a gathering writer given first in one turn, then one item alone."""
    wire = Wire()
    writer = wire.writer(gather=gather)
    for item in first:
        writer.add(item)
    await wire.written(1)
    writer.add(then)
    await wire.written(2)
    await writer.close()
    return wire.batches


def test_a_lone_writer_never_waits_for_company() -> None:
    # Were it to wait its whole 60 s, wire.written would give up after 5.
    assert asyncio.run(first_then_one_more(60, ["a"], "b")) == [["a"], ["b"]]


def test_a_batch_gathers_for_at_most_its_time() -> None:
    assert asyncio.run(first_then_one_more(0.05, ["a", "b"], "c")) == [["a", "b"], ["c"]]


def test_an_item_taken_back_while_its_batch_gathers_leaves_no_empty_write() -> None:
    async def run() -> list[list[str]]:
        wire = Wire()
        writer = wire.writer(gather=60)
        writer.add("a")
        writer.add("b")
        await wire.written(1)
        writer.add("c")
        await asyncio.sleep(0)  # the writer gathers
        assert writer.take_back("c")
        await writer.close()
        return wire.batches

    assert asyncio.run(run()) == [["a", "b"]]
