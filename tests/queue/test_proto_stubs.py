"""The committed gRPC stubs are exactly what proto/ generates (`make proto` refreshes them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

STUBS = REPO / "services" / "kurrier" / "v1"


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    protos = sorted(str(p.relative_to(REPO / "proto")) for p in (REPO / "proto").rglob("*.proto"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            *protos,
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    generated = sorted(p.name for p in (tmp_path / "kurrier" / "v1").iterdir())
    committed = sorted(p.name for p in STUBS.iterdir() if p.suffix in (".py", ".pyi"))
    assert [n for n in committed if n != "__init__.py"] == generated
    for name in generated:
        fresh = (tmp_path / "kurrier" / "v1" / name).read_text()
        assert (STUBS / name).read_text() == fresh, f"{name} is stale: run `make proto`"
