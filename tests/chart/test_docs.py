"""The chart README's values table matches values.yaml, and every value is documented."""

from __future__ import annotations

import pytest

from tests.chart.values_doc import README, rows, table


def test_every_value_is_documented() -> None:
    documented, missing = rows()
    assert missing == [], "add a '# -- description' comment above these keys in values.yaml"
    assert len(documented) > 100


def test_readme_values_table_is_current() -> None:
    readme = README.read_text()
    assert table() in readme, (
        "charts/kurrier/README.md's values table is stale: "
        "run .venv/bin/python -m tests.chart.values_doc"
    )


def test_undocumented_keys_are_found() -> None:
    text = "# -- documented\na: 1\nb:\n  # -- nested\n  c: 2\n  d: 3\n"
    found, missing = rows(text)
    assert [(r.key, r.description) for r in found] == [("a", "documented"), ("b.c", "nested")]
    assert missing == ["b.d"]
    with pytest.raises(ValueError, match=r"\['b.d'\]"):
        table(text)
