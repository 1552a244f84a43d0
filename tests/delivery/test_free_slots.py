"""How many jobs delivery takes: transactions hold slots; recordings that pile up stop it."""

from __future__ import annotations

import pytest
from kurrier.delivery.worker import free_slots


@pytest.mark.parametrize(
    ("transactions", "recordings", "free"),
    [
        (0, 0, 4),
        (3, 0, 1),
        (4, 0, 0),
        # Attempts being recorded take no slot...
        (1, 4, 3),
        # ...until more of them wait than transactions may run.
        (1, 5, 0),
        (0, 9, 0),
    ],
)
def test_slots_left_for_new_jobs(transactions: int, recordings: int, free: int) -> None:
    assert free_slots(4, transactions, recordings) == free
