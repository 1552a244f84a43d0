"""The CRDs in charts/kurrier/crds are exactly what the models generate, and say the same.

The API server side of the same promise (it accepts and rejects what the
models accept and reject) is in test_schema_on_apiserver.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from kurrier.core.resources import RelayDomainSpec, RelayPolicySpec, RouteMatch
from kurrier.operator import crds
from kurrier.operator.crds import (
    DOMAIN_PATTERN_RE2,
    DOMAIN_RE2,
    DURATION_RE2,
    SchemaError,
    model_schema,
)
from pydantic import BaseModel, ValidationError

from tests.support.chart import CHART_CRDS

# Spellings a user may write: the RE2 patterns the API server runs and the
# Python validators must agree on every one of them.
DOMAINS = [
    "example.com",
    "EXAMPLE.com",
    "example.com.",
    "a.b.c.d.example.co.uk",
    "xn--bcher-kva.example",
    "a-b.example",
    "1.2.example",
    "x" * 63 + ".example",
    "x" * 64 + ".example",
    "-bad.example",
    "bad-.example",
    "bad..example",
    ".example",
    "",
    "bad domain.example",
    "under_score.example",
    "*.example.com",
    "*",
    "*.",
    "**.example",
    "a.*.example",
    "*example.com",
]


def test_committed_crds_are_what_the_models_generate() -> None:
    generated = crds.render_crds()
    committed = {p.name: p.read_text() for p in CHART_CRDS.glob("*.yaml")}
    assert sorted(committed) == sorted(generated)
    for name, text in generated.items():
        assert committed[name] == text, (
            f"{name} is stale: run `python -m kurrier.operator.crds charts/kurrier/crds`"
        )


def _accepts(model: type[BaseModel], document: dict[str, Any]) -> bool:
    try:
        model.model_validate(document)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("value", DOMAINS)
def test_domain_regexes_of_the_crd_agree_with_the_models(value: str) -> None:
    as_domain = _accepts(RelayDomainSpec, {"domain": value})
    assert bool(re.match(DOMAIN_RE2, value)) == as_domain
    as_pattern = _accepts(RouteMatch, {"recipientDomains": [value]})
    assert bool(re.match(DOMAIN_PATTERN_RE2, value)) == as_pattern


DURATIONS = ["4h", "0s", "1h30m", "90s", "1.5h", "500ms", "2d", "", "4", "h", "4 h", "-1h", "1y"]


@pytest.mark.parametrize("value", DURATIONS)
def test_duration_regex_of_the_crd_agrees_with_the_model(value: str) -> None:
    as_duration = _accepts(RelayPolicySpec, {"delayWarningTime": value})
    assert bool(re.match(DURATION_RE2, value)) == as_duration


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, child in schema.get("properties", {}).items():
        found += _walk(child, f"{path}.{name}")
    if "items" in schema:
        found += _walk(schema["items"], f"{path}[]")
    return found


@pytest.mark.parametrize("kind", crds.KINDS, ids=lambda k: k.kind)
def test_schemas_are_structural_and_described(kind: crds.CrdKind) -> None:
    root = crds.crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(root):
        assert "type" in node, f"{path}: every node needs a type (structural schema)"
        assert not {"$ref", "anyOf", "allOf", "oneOf", "additionalProperties"} & set(node), path
        if path.count(".") >= 2 and not path.endswith("[]"):
            assert node.get("description"), f"{kind.kind}{path} has no description"


def test_a_field_without_description_is_refused() -> None:
    class Undocumented(BaseModel):
        """An object."""

        mystery: int

    with pytest.raises(SchemaError, match=r"Undocumented\.mystery has no description"):
        model_schema(Undocumented)


def test_unions_other_than_optional_are_refused() -> None:
    class Ambiguous(BaseModel):
        """An object."""

        either: int | str

    crds.DOCS["Ambiguous.either"] = "an int or a str"
    try:
        with pytest.raises(SchemaError, match="unions cannot be expressed"):
            model_schema(Ambiguous)
    finally:
        del crds.DOCS["Ambiguous.either"]


def test_printer_columns_show_domains_destination_ready_and_age() -> None:
    [route] = [k for k in crds.KINDS if k.kind == "RelayRoute"]
    columns = crds.crd(route)["spec"]["versions"][0]["additionalPrinterColumns"]
    shown = [c["name"] for c in columns if not c.get("priority")]
    assert shown == ["Priority", "Domains", "Destination", "TLS", "Ready", "Age"]


def test_the_generator_writes_the_files(tmp_path: Path) -> None:
    assert crds.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(crds.render_crds())
