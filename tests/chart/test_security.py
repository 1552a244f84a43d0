"""Every pod the chart renders runs locked down: non-root, no privileges, resources set."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.chart import SCENARIOS, Scenario, by_kind, pod_specs, render
from tests.support.kube import Obj


def api_components(s: Scenario) -> set[str]:
    """The pods that may talk to the API server: the operator, and ingress for TokenReview."""
    ingress = s.values.get("ingress", {})
    return {"operator"} | ({"ingress"} if ingress.get("tokenReview", {}).get("enabled") else set())


def problems_of(s: Scenario, objects: list[Obj]) -> list[str]:
    problems: list[str] = []
    specs = list(pod_specs(objects))
    assert specs, "no pods rendered"
    for label, spec in specs:
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{label}: pod securityContext.runAsNonRoot is not true")
        if psc.get("runAsUser", 1) == 0 or psc.get("runAsGroup", 1) == 0:
            problems.append(f"{label}: pod runs as uid/gid 0")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{label}: pod seccompProfile is not RuntimeDefault")
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(host):
                problems.append(f"{label}: {host}")
        for volume in spec.get("volumes", []):
            if "hostPath" in volume:
                problems.append(f"{label}: hostPath volume {volume['name']}")
        component = label.split("/", 1)[1].removeprefix("kurrier-")
        if (
            component not in api_components(s)
            and spec.get("automountServiceAccountToken") is not False
        ):
            problems.append(f"{label}: mounts a ServiceAccount token but needs no API access")
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{label} container {c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if s.production and sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities are not dropped (drop: [ALL])")
            if sc.get("capabilities", {}).get("add"):
                problems.append(f"{where}: adds capabilities")
            if sc.get("runAsUser", 1) == 0 or sc.get("runAsNonRoot") is False:
                problems.append(f"{where}: runs as root")
            resources = c.get("resources", {})
            for key in ("cpu", "memory"):
                if key not in resources.get("requests", {}):
                    problems.append(f"{where}: no {key} request")
            if "memory" not in resources.get("limits", {}):
                problems.append(f"{where}: no memory limit")
            image = c["image"]
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"{where}: image {image} has no pinned tag")
            for port in c.get("ports", []):
                if port["containerPort"] < 1024:
                    problems.append(f"{where}: privileged port {port['containerPort']}")
            # kurrier spools large bodies to /tmp: it must be a writable volume (NATS's
            # two containers and the test hook's sender run no kurrier service).
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if c["name"] not in ("nats", "tls-reloader", "send-mail") and "/tmp" not in mounts:
                problems.append(f"{where}: no writable /tmp volume")
    return problems


@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_pods_are_locked_down(helm_bin: Path, s: Scenario, tmp_path: Path) -> None:
    objects = render(helm_bin, s, tmp_path)
    assert problems_of(s, objects) == []


def test_the_checks_catch_problems(helm_bin: Path, tmp_path: Path) -> None:
    """The checker itself: loosened values must produce findings."""
    loose = Scenario(
        "loose",
        {
            "podSecurityContext": {"runAsNonRoot": False, "runAsUser": 0},
            "containerSecurityContext": {
                "privileged": True,
                "allowPrivilegeEscalation": True,
                "readOnlyRootFilesystem": False,
                "capabilities": {"drop": [], "add": ["NET_BIND_SERVICE"]},
            },
            "queue": {"resources": {"limits": {"memory": None}}},
        },
    )
    problems = problems_of(loose, render(helm_bin, loose, tmp_path))
    text = "\n".join(problems)
    for expected in (
        "Deployment/kurrier-ingress: pod securityContext.runAsNonRoot is not true",
        "Deployment/kurrier-ingress: pod runs as uid/gid 0",
        "Deployment/kurrier-queue container queue: privileged",
        "StatefulSet/kurrier-nats container nats: allowPrivilegeEscalation is not false",
        "Pod/kurrier-test-send-mail container send-mail: readOnlyRootFilesystem is not true",
        "Deployment/kurrier-delivery container delivery: capabilities are not dropped",
        "Deployment/kurrier-operator container operator: adds capabilities",
        "Deployment/kurrier-queue container queue: no memory limit",
    ):
        assert expected in text, text


def test_only_the_operator_can_reach_the_api(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, Scenario("sa"), tmp_path)
    for account in by_kind(objects, "ServiceAccount"):
        name = account["metadata"]["name"]
        assert account["automountServiceAccountToken"] is (name == "kurrier-operator"), name
    bound = {
        subject["name"]
        for binding in by_kind(objects, "ClusterRoleBinding") + by_kind(objects, "RoleBinding")
        for subject in binding["subjects"]
    }
    assert bound == {"kurrier-operator"}
