"""The nemesis's checker (tests/support/checker.py) on ledgers and arrivals made by hand."""

from __future__ import annotations

from tests.support.checker import check, combined, outcome
from tests.support.load import Ledger, message
from tests.support.sink import Received

RECIPIENT = "r@example.com"
SENDER = "load@client.test"


def _delivery(marker: str) -> Received:
    return Received(SENDER, (RECIPIENT,), message(marker), connection=1)


def _bounce(marker: str) -> Received:
    # A DSN returns the original's headers; the marker is its Subject there.
    report = b"Subject: Undelivered Mail\r\n\r\nreturned:\r\n" + message(marker)
    return Received("", (SENDER,), report, connection=1)


def test_lost_is_acknowledged_neither_delivered_nor_bounced() -> None:
    ledger = Ledger(acknowledged={"m1", "m2", "m3", "m4"}, in_doubt={"m5"}, refused={"m6"})
    received = [_delivery("m1"), _delivery("m1"), _delivery("m2"), _bounce("m3")]
    received += [_delivery("m5"), _delivery("m9")]

    report = check(ledger, outcome(received, RECIPIENT, SENDER, ledger.attempted))

    assert report.lost == ("m4",)
    assert (report.acknowledged, report.delivered, report.bounced) == (4, 4, 1)
    assert (report.duplicated, report.extra_copies) == (1, 1)
    assert report.in_doubt_delivered == 1
    assert report.phantoms == ("m9",)


def test_the_ledgers_of_two_ingresses_are_checked_together() -> None:
    first = Ledger(acknowledged={"a1", "a2"})
    second = Ledger(acknowledged={"b1", "b2"}, in_doubt={"b3"})
    ledger = combined([first, second])
    received = [_delivery("a1"), _delivery("b1"), _delivery("b3"), _bounce("a2")]

    report = check(ledger, outcome(received, RECIPIENT, SENDER, ledger.attempted))

    assert report.lost == ("b2",)
    assert (report.acknowledged, report.delivered, report.bounced) == (4, 3, 1)
    assert report.in_doubt_delivered == 1
    assert report.phantoms == ()
