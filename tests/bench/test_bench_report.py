"""The benchmark's system names and its table: what each row promises, and whom it is measured
against (no relay runs here: the cells are made up)."""

from __future__ import annotations

import pytest

from bench.measure import CellResult
from bench.report import markdown_table
from bench.systems import KurrierVariant


@pytest.mark.parametrize(
    ("name", "args", "durability"),
    [
        ("kurrier", [], "power cut (fsync before 250)"),
        ("kurrier/sync=2m", ["--nats-sync", "2m"], "page cache only (sync 2m)"),
        (
            "kurrier/cluster=3",
            ["--nats-cluster", "3"],
            "one node lost (R3 quorum of 3, page cache; sync 2m)",
        ),
        (
            "kurrier+uvloop/cluster=3/sync=always",
            ["--nats-cluster", "3", "--nats-sync", "always"],
            "one node lost (R3 quorum of 3, fsync)",
        ),
        ("kurrier@abc123", [], "abc123's default"),
        ("kurrier/batch=16", ["--atomic-batch-min", "16"], "power cut (fsync before 250)"),
        ("kurrier/python=running", [], "power cut (fsync before 250)"),
    ],
)
def test_a_kurrier_name_says_how_it_runs_and_what_its_250_survives(
    name: str, args: list[str], durability: str
) -> None:
    variant = KurrierVariant.parse(name)
    assert variant.up_args() == args
    assert variant.durability == durability


def test_an_unknown_option_is_refused() -> None:
    with pytest.raises(ValueError, match="/cluster=N, /sync=INTERVAL, /batch=N and /python=NAME"):
        KurrierVariant.parse("kurrier/replicas=3")


def test_the_interpreter_is_named_not_given_as_a_path() -> None:
    assert KurrierVariant.parse("kurrier/python=running/cluster=3").python == "running"
    assert KurrierVariant.parse("kurrier").python is None  # the run's --kurrier-python
    with pytest.raises(ValueError, match="one of optimised, running"):
        KurrierVariant.parse("kurrier/python=pypy")


def test_the_table_shows_durability_and_each_kurrier_against_each_peer() -> None:
    systems = {"kurrier": "fsync", "kurrier/cluster=3": "quorum", "postfix": "fsync", "haraka": "x"}
    rates = {"kurrier": 100.0, "kurrier/cluster=3": 150.0, "postfix": 200.0, "haraka": 50.0}
    cells = [
        CellResult(name, 1024, 10, 0, name, durability=promise, e2e_per_s=rates[name])
        for name, promise in systems.items()
    ]
    rows = [line.split(" | ") for line in markdown_table(cells).splitlines()[2:]]
    by_system = {row[2]: row for row in rows}
    assert [by_system[name][3] for name in systems] == list(systems.values())
    e2e = 5  # size, sessions, system, durability, accepted, end-to-end
    assert by_system["**kurrier/Postfix**"][e2e] == "**0.50x**"
    assert by_system["**kurrier/Haraka**"][e2e] == "**2.00x**"
    assert by_system["**kurrier/cluster=3/Haraka**"][e2e] == "**3.00x**"
    assert by_system["**kurrier/cluster=3/kurrier**"][e2e] == "**1.50x**"
    assert "**postfix/Haraka**" not in by_system
