"""The interpreter the benchmark runs kurrier on by default: Debian's python3.11 (built
with PGO and LTO, as the image's CPython is) with the packages of the interpreter
running the benchmark, at the same versions, and this checkout's kurrier. Made here
in a cache of the test's own, so that making it is what is tested."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import interpreter
from bench.interpreter import REPO, describe, kurrier_python

VERSIONS = (
    "import importlib.metadata as m, json, kurrier.cli; "
    "print(json.dumps({'kurrier': kurrier.cli.__file__, "
    "'packages': {d.metadata['Name'].lower(): d.version for d in m.distributions()}}))"
)


def _installed(python: str) -> dict[str, object]:
    found = subprocess.run([python, "-c", VERSIONS], capture_output=True, text=True, check=True)
    loaded: dict[str, object] = json.loads(found.stdout)
    return loaded


def test_kurrier_runs_on_debians_python_with_the_running_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(interpreter, "CACHE", tmp_path)
    (tmp_path / "bench-python-0123456789ab" / "bin").mkdir(parents=True)  # other versions'
    optimised = kurrier_python("optimised")
    assert optimised != sys.executable
    assert describe(optimised).endswith("(Debian's, PGO and LTO)")
    assert kurrier_python("optimised") == optimised  # made once, then found
    assert [path.name for path in tmp_path.glob("bench-python-*")] == [
        Path(optimised).parent.parent.name
    ]
    mine, theirs = _installed(sys.executable), _installed(optimised)
    assert Path(str(theirs["kurrier"])).is_relative_to(REPO / "services")
    packages, running = theirs["packages"], mine["packages"]
    assert isinstance(packages, dict) and isinstance(running, dict)
    for name in ("grpcio", "nats-py", "aiosmtpd", "pydantic", "uvloop", "opentelemetry-sdk"):
        assert packages[name] == running[name], name
