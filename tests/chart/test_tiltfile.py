"""The Tiltfile, evaluated by a real Starlark interpreter with stub Tilt builtins:
it parses and runs, and everything it names exists and fits together (the image
build, the chart and its dev values, the workloads it port-forwards)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import starlark as sl

from tests.chart.dockerfile_model import context_files, parse_dockerfile
from tests.chart.tilt_stubs import Recorder, TiltStubs, evaluate_tiltfile
from tests.support import REPO
from tests.support.chart import Scenario, by_kind, render
from tests.support.kube import Obj

TILTFILE = REPO / "Tiltfile"


def tilt_problems(rec: Recorder, helm_bin: Path, tmp_path: Path) -> list[str]:
    """Everything wrong with what a Tiltfile asked for; empty when it all fits."""
    problems: list[str] = []
    root = rec.root

    def exists(path: str, what: str) -> bool:
        if not (root / path).exists():
            problems.append(f"{what} {path} does not exist")
            return False
        return True

    for name in rec.files_named:
        exists(name, "file")

    # -- the image
    if len(rec.docker_builds) != 1:
        problems.append(f"expected one image build, got {len(rec.docker_builds)}")
        return problems
    build = rec.docker_builds[0]
    exists(build.context, "build context")
    context = set(context_files(root / build.context))
    if exists(str(Path(build.context) / build.dockerfile), "Dockerfile"):
        dockerfile = parse_dockerfile(root / build.context / build.dockerfile)
        stages = [s.name for s in dockerfile.stages]
        if build.target and build.target not in stages:
            problems.append(f"target {build.target!r} is not a Dockerfile stage ({stages})")
            return problems
        target = build.target or stages[-1]
        entrypoint = dockerfile.effective(target, "ENTRYPOINT")
        if entrypoint is None or list(entrypoint.value) != build.entrypoint:
            problems.append(f"entrypoint {build.entrypoint} differs from the image's {entrypoint}")
        user = dockerfile.effective(target, "USER")
        runs = " ".join(" ".join(i.value) for i in dockerfile.all(target, "RUN"))
        home = re.search(r"--home-dir (\S+)", runs)
        if build.restart_file is not None:
            parent = str(Path(build.restart_file).parent)
            if home is None or parent != home.group(1) or user is None:
                problems.append(
                    f"restart file {build.restart_file} must be in the runtime user's home "
                    f"({home.group(1) if home else 'none'}): / is root's and /tmp an emptyDir"
                )
        for step in build.live_update:
            if step["step"] == "sync":
                local, remote = step["local_path"], step["remote_path"]
                if exists(local, "live_update source") and not any(
                    f.startswith(local.rstrip("/") + "/") for f in context
                ):
                    problems.append(f"live_update source {local} is outside the build context")
                if f"chown -R 10001:10001 {remote}" not in runs:
                    problems.append(f"live_update target {remote} is not writable in {target}")
            elif step["step"] == "fall_back_on":
                for f in step["files"]:
                    exists(f, "fall_back_on file")
            else:
                problems.append(f"unexpected live_update step {step}")

    # -- the chart
    objects: list[Obj] = []
    for call in rec.helm_calls:
        if not exists(call.chart, "chart") or not exists(f"{call.chart}/Chart.yaml", "chart"):
            continue
        if not all(exists(v, "values file") for v in call.values):
            continue
        s = Scenario("tilt", files=tuple(root / v for v in call.values))
        objects += render(
            helm_bin, s, tmp_path, release=call.name or "chart", namespace=call.namespace
        )
    if not rec.helm_calls:
        problems.append("the Tiltfile deploys no chart")

    workloads: dict[str, Obj] = {
        o["metadata"]["name"]: o for o in objects if o["kind"] in ("Deployment", "StatefulSet")
    }
    for name, w in workloads.items():
        for c in w["spec"]["template"]["spec"]["containers"]:
            repo = c["image"].rsplit(":", 1)[0]
            if repo.endswith("kurrier") and repo != build.ref:
                problems.append(f"{name} runs {c['image']}, which Tilt builds as {build.ref!r}")
            if repo == build.ref and "command" in c:
                problems.append(f"{name} sets command, which the restart wrapper replaces")
    if not any(
        c["image"].rsplit(":", 1)[0] == build.ref
        for w in workloads.values()
        for c in w["spec"]["template"]["spec"]["containers"]
    ):
        problems.append(f"no workload runs the image {build.ref!r} that Tilt builds")

    # -- resources
    resource_names = {r.workload for r in rec.k8s_resources} | {r.name for r in rec.local_resources}
    local_ports: list[int] = []
    for r in rec.k8s_resources:
        if r.workload not in workloads:
            problems.append(f"k8s_resource {r.workload!r} is not a rendered workload")
            continue
        ports = {
            p["containerPort"]
            for c in workloads[r.workload]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for pf in r.port_forwards:
            local_ports.append(pf["local_port"])
            if pf["container_port"] not in ports:
                problems.append(
                    f"{r.workload}: port_forward to {pf['container_port']}, not a container port"
                )
        for dep in r.resource_deps:
            if dep not in resource_names:
                problems.append(f"{r.workload}: unknown resource_dep {dep!r}")
    if len(local_ports) != len(set(local_ports)):
        problems.append(f"local ports forwarded twice: {sorted(local_ports)}")
    for lr in rec.local_resources:
        for dep in lr.resource_deps:
            if dep not in resource_names:
                problems.append(f"{lr.name}: unknown resource_dep {dep!r}")
        argv = lr.cmd if isinstance(lr.cmd, list) else shlex.split(lr.cmd)
        if argv[:2] == ["python3", "-c"]:
            compile(argv[2], lr.name, "exec")
            for port in re.findall(r'"127\.0\.0\.1", (\d+)', argv[2]):
                if int(port) not in local_ports:
                    problems.append(f"{lr.name} talks to 127.0.0.1:{port}, not port-forwarded")
        if argv[:2] == ["kubectl", "exec"]:
            namespace = argv[argv.index("-n") + 1]
            target = next(a for a in argv if a.startswith("deploy/"))
            if namespace not in {c.namespace for c in rec.helm_calls}:
                problems.append(f"{lr.name}: namespace {namespace} is not the chart's")
            if target.removeprefix("deploy/") not in workloads:
                problems.append(f"{lr.name}: {target} is not a rendered Deployment")
    for blob in rec.blobs:
        if "kind: Namespace" in blob and not any(
            f"name: {c.namespace}" in blob for c in rec.helm_calls
        ):
            problems.append("the Namespace the Tiltfile creates is not the chart's")
    return problems


def test_tiltfile_parses() -> None:
    dialect = sl.Dialect.standard()
    ast = sl.parse("Tiltfile", TILTFILE.read_text(), dialect)
    assert [load.module_id for load in ast.loads()] == ["ext://restart_process"]


def test_tiltfile_evaluates_and_everything_it_names_fits(helm_bin: Path, tmp_path: Path) -> None:
    rec = evaluate_tiltfile(TILTFILE)
    assert rec.loads == ["ext://restart_process"]
    assert [b.ref for b in rec.docker_builds] == ["kurrier"]
    assert [h.chart for h in rec.helm_calls] == ["charts/kurrier"]
    assert {r.workload for r in rec.k8s_resources} >= {
        "kurrier-ingress",
        "kurrier-queue",
        "kurrier-delivery",
        "kurrier-operator",
        "kurrier-nats",
        "kurrier-sink",
    }
    forwarded = {pf["local_port"] for r in rec.k8s_resources for pf in r.port_forwards}
    assert {2525, 2526} <= forwarded, "SMTP and the sink are port-forwarded"
    assert tilt_problems(rec, helm_bin, tmp_path) == []


def test_dev_values_render_what_tilt_deploys(helm_bin: Path, tmp_path: Path) -> None:
    rec = evaluate_tiltfile(TILTFILE)
    call = rec.helm_calls[0]
    objects = render(
        helm_bin, Scenario("tilt", files=tuple(REPO / v for v in call.values)), tmp_path
    )
    assert {d["metadata"]["name"] for d in by_kind(objects, "Deployment")} >= {"kurrier-sink"}
    for d in by_kind(objects, "Deployment"):
        c = d["spec"]["template"]["spec"]["containers"][0]
        # Live update writes into the container: the root filesystem stays writable in dev.
        assert c["securityContext"]["readOnlyRootFilesystem"] is False
        assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("CHART = 'charts/kurrier'", "chart charts/nope does not exist"),
        ("target='dev'", "target 'prod' is not a Dockerfile stage"),
        ("sync('services/kurrier', SITE_PACKAGES)", "live_update source services/nope"),
        ("port_forward(2526, 2526", "port_forward to 2999, not a container port"),
        ("k8s_resource('kurrier-queue'", "k8s_resource 'kurrier-queuee' is not a rendered"),
        ("restart_file='/home/kurrier/.restart-proc'", "restart file /tmp/.restart-proc"),
        ("IMAGE = 'kurrier'", "which Tilt builds as 'kurrier-dev'"),
    ],
)
def test_the_checks_catch_a_broken_tiltfile(
    helm_bin: Path, tmp_path: Path, change: str, expected: str
) -> None:
    replacement = {
        "CHART = 'charts/kurrier'": "CHART = 'charts/nope'",
        "target='dev'": "target='prod'",
        "sync('services/kurrier', SITE_PACKAGES)": "sync('services/nope', SITE_PACKAGES)",
        "port_forward(2526, 2526": "port_forward(2526, 2999",
        "k8s_resource('kurrier-queue'": "k8s_resource('kurrier-queuee'",
        "restart_file='/home/kurrier/.restart-proc'": "restart_file='/tmp/.restart-proc'",
        "IMAGE = 'kurrier'": "IMAGE = 'kurrier-dev'",
    }[change]
    source = TILTFILE.read_text()
    assert change in source
    rec = TiltStubs(REPO).evaluate(source.replace(change, replacement, 1))
    problems = tilt_problems(rec, helm_bin, tmp_path)
    assert any(expected in p for p in problems), problems


def test_stubs_reject_unknown_keywords() -> None:
    with pytest.raises(sl.StarlarkError):
        TiltStubs(REPO).evaluate("docker_build('x', '.', dockerfle='Dockerfile')\n")
