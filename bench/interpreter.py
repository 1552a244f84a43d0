"""The interpreter kurrier's processes run on in a benchmark: CPython built as the image's is.

kurrier's image runs on python:3.11-slim, whose CPython is compiled with
profile-guided and link-time optimisation (PGO, LTO) and so is Debian's
python3.11 (its interpreter also links libpython statically). A CPython
built from source with configure's defaults, as pyenv builds it, has
neither: on it kurrier's services spend about a sixth more CPU per message
(bench/results/2026-12-07-optimised-interpreter.md), so a benchmark run
there would weigh a slower kurrier than the one that ships against peers
compiled by Debian.

"optimised" is a virtual environment made from Debian's python3.11 (installed
from Debian's packages when missing, as Postfix is), with kurrier installed
editable from this checkout and every package at the version the running
interpreter has, kept in ~/.cache/kurrier (one at a time: a new one, made
when the versions change, replaces the last). "running" is the interpreter
running the benchmark.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

INTERPRETERS = ("optimised", "running")
REPO = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = Path("/usr/bin/python3.11")
CACHE = Path(os.environ.get("KURRIER_CACHE", Path.home() / ".cache" / "kurrier"))
# Written last: a venv without it was cut off while being made.
_COMPLETE = "kurrier-bench-complete"


def kurrier_python(choice: str) -> str:
    """The interpreter that runs `kurrier up` (and so its services) for choice."""
    if choice == "running":
        return sys.executable
    if choice == "optimised":
        return str(optimised_venv() / "bin" / "python")
    raise ValueError(f"unknown interpreter {choice!r}; known: {', '.join(INTERPRETERS)}")


def describe(python: str) -> str:
    """`CPython 3.11.2 (Debian's, PGO and LTO)` or `CPython 3.11.7 (<its base path>)`."""
    found = subprocess.run(
        [python, "-c", "import platform, sys; print(platform.python_version(), sys.base_prefix)"],
        capture_output=True,
        text=True,
        check=True,
    )
    version, base = found.stdout.split()
    built = "Debian's, PGO and LTO" if Path(base) == DEBIAN_PYTHON.parent.parent else base
    return f"CPython {version} ({built})"


def optimised_venv() -> Path:
    """The venv of Debian's python3.11 with this run's package versions, made once."""
    _install_debian_python()
    pins = _pinned_packages()
    key = hashlib.sha256(
        b"\0".join([str(DEBIAN_PYTHON.resolve()).encode(), pins.encode(), _dependencies()])
    ).hexdigest()[:12]
    venv = CACHE / f"bench-python-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    # A test and a benchmark may both come to make it: one makes it, the other waits.
    with (CACHE / "bench-python.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / _COMPLETE).exists():
            _make_venv(venv, pins)
            # One made for other versions is not used again: 150 MB each.
            for earlier in CACHE.glob("bench-python-*"):
                if earlier != venv:
                    shutil.rmtree(earlier, ignore_errors=True)
    return venv


def _make_venv(venv: Path, pins: str) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    print(f"making {venv} from Debian's python3.11 ...", flush=True)
    subprocess.run([str(DEBIAN_PYTHON), "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(pins)
    subprocess.run(
        [
            *(str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"),
            *("--constraint", str(constraints), "--editable", str(REPO)),
        ],
        check=True,
    )
    (venv / _COMPLETE).touch()


def _install_debian_python() -> None:
    if _has_venv_module():
        return
    if os.geteuid() != 0:
        raise RuntimeError(
            f"{DEBIAN_PYTHON} with its venv module is missing and installing it needs root "
            "(Debian: apt-get install python3.11 python3.11-venv), or run with "
            "--kurrier-python running"
        )
    print("installing python3.11 from Debian's packages ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [
            *("apt-get", "install", "-y", "-qq", "--no-install-recommends"),
            *("python3.11", "python3.11-venv"),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    if not _has_venv_module():
        raise RuntimeError(f"{DEBIAN_PYTHON} did not install with its venv module")


def _has_venv_module() -> bool:
    if not DEBIAN_PYTHON.exists():
        return False
    # Debian splits ensurepip, which venv needs, into python3.11-venv.
    found = subprocess.run([str(DEBIAN_PYTHON), "-c", "import ensurepip, venv"], check=False)
    return found.returncode == 0


def _pinned_packages() -> str:
    """The running interpreter's packages as pins (`name==version`), kurrier left out."""
    found = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    )
    return "".join(
        f"{line}\n"
        for line in found.stdout.splitlines()
        if "==" in line and not line.startswith("kurrier")
    )


def _dependencies() -> bytes:
    return (REPO / "pyproject.toml").read_bytes()
