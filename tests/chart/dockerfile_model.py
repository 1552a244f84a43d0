"""The Dockerfile as data (parsed by BuildKit's own parser via the `dockerfile`
package) and the build context as Docker computes it from .dockerignore."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

# The package ships a compiled module without type information.
_dockerfile: Any = importlib.import_module("dockerfile")


@dataclass(frozen=True)
class Instruction:
    cmd: str  # upper case, e.g. "COPY"
    value: tuple[str, ...]
    flags: tuple[str, ...]
    json: bool
    line: int


@dataclass
class Stage:
    name: str
    base: str  # the FROM argument, ARGs substituted
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]  # global ARG defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise AssertionError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, nearest first."""
        names = {s.name for s in self.stages}
        out = [self.stage(name)]
        while out[-1].base in names:
            out.append(self.stage(out[-1].base))
        return out

    def effective(self, name: str, cmd: str) -> Instruction | None:
        """The last `cmd` instruction in effect for a stage (USER, ENTRYPOINT, ...)."""
        for stage in self.chain(name):
            found = [i for i in stage.instructions if i.cmd == cmd]
            if found:
                return found[-1]
        return None

    def all(self, name: str, cmd: str) -> list[Instruction]:
        return [i for s in reversed(self.chain(name)) for i in s.instructions if i.cmd == cmd]


def _substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(
        r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), text
    )


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for command in _dockerfile.parse_file(str(path)):
        inst = Instruction(
            cmd=command.cmd.upper(),
            value=tuple(command.value),
            flags=tuple(command.flags),
            json=bool(command.json),
            line=int(command.start_line),
        )
        if inst.cmd == "FROM":
            words = [_substitute(v, args) for v in inst.value]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif not stages and inst.cmd == "ARG":
            key, _, default = inst.value[0].partition("=")
            args[key] = default
        elif stages:
            stages[-1].instructions.append(inst)
        else:
            raise AssertionError(f"line {inst.line}: {inst.cmd} before the first FROM")
    return Dockerfile(args=args, stages=stages)


# --------------------------------------------------------------------------- context


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex on slash paths."""
    out = ""
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out + r"\Z")


@dataclass(frozen=True)
class IgnoreRule:
    regex: re.Pattern[str]
    exclusion: bool  # a `!pattern` line re-includes


def ignore_rules(path: Path = DOCKERIGNORE) -> list[IgnoreRule]:
    rules: list[IgnoreRule] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append(IgnoreRule(_pattern_regex(pattern), exclusion))
    return rules


def ignored(relpath: str, rules: list[IgnoreRule]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for rule in rules:
        if any(rule.regex.match(c) for c in candidates):
            result = not rule.exclusion
    return result


def context_files(root: Path = REPO) -> Iterator[str]:
    """Relative paths of the files `docker build .` sends (the repo minus .dockerignore)."""
    rules = ignore_rules(root / ".dockerignore")
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            rel_dir = ""
        # .git is never part of a build context worth having.
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if not ignored(rel, rules):
                yield rel
