"""Load kurrier resources from multi-document YAML, with errors a human can act on."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from kurrier.core.resources import KINDS, Resource
from pydantic import TypeAdapter, ValidationError

_RESOURCE = TypeAdapter[Resource](Resource)


class ResourceError(Exception):
    """One or more documents are not valid resources; str() lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _describe(index: int, document: Any) -> str:
    kind = document.get("kind", "?") if isinstance(document, dict) else "?"
    metadata = document.get("metadata") if isinstance(document, dict) else None
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return f"document {index} ({kind} {name!r})" if name else f"document {index} ({kind})"


def _field_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in KINDS:
            # pydantic names the union member it tried; the user wrote no such field.
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or "(document)"


def parse_documents(documents: Iterable[Any], source: str) -> list[Resource]:
    """Validate already-parsed YAML/JSON documents; empty documents are skipped."""
    resources: list[Resource] = []
    problems: list[str] = []
    for index, document in enumerate(documents, start=1):
        if document is None:
            continue
        where = f"{source}: {_describe(index, document)}"
        if not isinstance(document, dict):
            problems.append(f"{where}: expected a mapping, got {type(document).__name__}")
            continue
        if document.get("kind") not in KINDS:
            problems.append(
                f"{where}: kind: {document.get('kind')!r} is not one of {', '.join(KINDS)}"
            )
            continue
        try:
            resources.append(_RESOURCE.validate_python(document))
        except ValidationError as error:
            for detail in error.errors():
                problems.append(f"{where}: {_field_path(detail['loc'])}: {detail['msg']}")
    if problems:
        raise ResourceError(problems)
    return resources


def load_resources(path: Path) -> list[Resource]:
    """Read a multi-document YAML file of RelayDomain/RelayRoute/RelayPolicy/Secret."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ResourceError([f"{path}: cannot read: {error.strerror}"]) from None
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        raise ResourceError([f"{path}: not valid YAML: {error}".replace("\n", " ")]) from None
    return parse_documents(documents, str(path))
