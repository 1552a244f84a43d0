"""Rendering charts/kurrier with a real helm.

A :class:`Scenario` is one value set the chart must handle; :func:`render`
runs ``helm template`` on it and returns the objects (as JSON-like dicts, the
:data:`tests.support.kube.Obj` the API client sends). The chart, operator and
telemetry tests render with it.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO
from tests.support.kube import Obj

CHART = REPO / "charts" / "kurrier"
CHART_CRDS = CHART / "crds"
DEV_VALUES = CHART / "values-dev.yaml"

RELEASE = "kurrier"


@dataclass(frozen=True)
class Scenario:
    """A value set: inline values plus value files, installed into ``namespace``."""

    name: str
    values: Mapping[str, Any] = field(default_factory=dict)
    files: tuple[Path, ...] = ()
    # Production scenarios must pass every security check; the dev values turn
    # readOnlyRootFilesystem off on purpose (Tilt live update writes code).
    production: bool = True

    @property
    def namespace(self) -> str:
        return f"kurrier-{self.name}"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("defaults"),
    Scenario(
        "external-nats",
        {
            "nats": {
                "external": {
                    "url": "nats://nats-0.infra:4222,nats://nats-1.infra:4222",
                    "streamReplicas": 3,
                    "credentials": {"secretName": "kurrier-nats-creds", "key": "user.creds"},
                }
            }
        },
    ),
    Scenario(
        "external-nats-tls",
        {
            "nats": {
                "external": {
                    "url": "tls://nats.infra:4222",
                    "tls": {"caSecretName": "infra-nats-ca", "key": "root.pem"},
                }
            }
        },
    ),
    Scenario(
        "nats-cluster",
        {"nats": {"replicas": 3, "storage": {"size": "20Gi", "storageClassName": "fast-ssd"}}},
    ),
    Scenario(
        "tls",
        {
            "hostname": "mx.example.com",
            "ingress": {
                "tls": {"enabled": True, "existingSecret": "mx-example-com-tls"},
                "ports": {"smtps": {"enabled": True}},
                "service": {
                    "type": "LoadBalancer",
                    "externalTrafficPolicy": "Local",
                    "loadBalancerSourceRanges": ["192.0.2.0/24"],
                },
            },
        },
    ),
    Scenario(
        "everything-on",
        {
            "hostname": "mx.example.com",
            "commonLabels": {"team": "mail"},
            "telemetry": {
                "otlp": {
                    "endpoint": "http://otel-collector.observability:4317",
                    "protocol": "grpc",
                },
                "resourceAttributes": {"deployment.environment": "test"},
                "sampler": "parentbased_traceidratio",
                "samplerArg": "0.5",
            },
            "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
            "networkPolicy": {
                "smtpFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                "metrics": {"namespaces": ["monitoring", "observability"]},
            },
            "ingress": {
                "tls": {
                    "enabled": True,
                    "certManager": {"enabled": True, "issuerRef": {"name": "letsencrypt"}},
                },
                "ports": {"smtps": {"enabled": True, "nodePort": 30465}},
                "service": {"type": "NodePort", "externalTrafficPolicy": "Local"},
                "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
                "extraEnv": [{"name": "EXTRA", "value": "1"}],
                "tokenReview": {"enabled": True},
            },
            "queue": {"mtls": {"certificates": "certManager"}},
            "nats": {"tls": {"certificates": "certManager"}},
            "delivery": {
                "autoscaling": {"enabled": True},
                "caBundle": {"configMapName": "corporate-ca"},
            },
            "operator": {
                "namespaces": ["mail-a", "mail-b"],
                "replicas": 2,
                "tenancy": {"enabled": True},
            },
            "devSink": {"enabled": True},
            "relayResources": {
                "domains": [{"name": "example-com", "spec": {"domain": "example.com"}}],
                "routes": [
                    {
                        "name": "everything-by-mx",
                        "spec": {
                            "priority": 10,
                            "match": {"recipientDomains": ["*"]},
                            "destination": {"mx": {}},
                            "tls": {"mode": "opportunistic"},
                        },
                    }
                ],
                "policies": [
                    {"name": "default", "spec": {"trustedNetworks": ["10.0.0.0/8"]}},
                ],
            },
        },
    ),
    Scenario(
        "everything-off",
        {
            "operator": {"enabled": False},
            "networkPolicy": {"enabled": False},
            "tests": {"enabled": False},
            "metrics": {"podAnnotations": False},
            "nats": {
                "pdb": {"enabled": False},
                "auth": {"enabled": False},
                "tls": {"enabled": False},
            },
            "ingress": {"pdb": {"enabled": False}, "ports": {"submission": {"enabled": False}}},
            "queue": {"pdb": {"enabled": False}, "mtls": {"enabled": False}},
            "delivery": {"pdb": {"enabled": False}},
        },
    ),
    Scenario("dev", files=(DEV_VALUES,), production=False),
)


def scenario(name: str) -> Scenario:
    return next(s for s in SCENARIOS if s.name == name)


class HelmError(AssertionError):
    """helm exited non-zero; the message carries its stderr."""


def helm(helm_bin: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(helm_bin), *args],
        capture_output=True,
        text=True,
        check=False,
        env=dict(env) if env is not None else None,
        timeout=120,
    )
    if proc.returncode != 0:
        raise HelmError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def values_args(s: Scenario, workdir: Path) -> list[str]:
    args: list[str] = []
    for path in s.files:
        args += ["--values", str(path)]
    if s.values:
        inline = workdir / f"values-{s.name}.yaml"
        inline.write_text(yaml.safe_dump(dict(s.values)))
        args += ["--values", str(inline)]
    return args


def render(
    helm_bin: Path,
    s: Scenario,
    workdir: Path,
    *,
    include_crds: bool = False,
    extra: Sequence[str] = (),
    release: str = RELEASE,
    namespace: str | None = None,
) -> list[Obj]:
    """``helm template`` the chart for a scenario; the rendered objects in order."""
    args = ["template", release, str(CHART), "--namespace", namespace or s.namespace]
    args += values_args(s, workdir)
    if include_crds:
        args.append("--include-crds")
    out = helm(helm_bin, *args, *extra)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: Sequence[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def find(objects: Sequence[Obj], kind: str, name: str) -> Obj:
    for o in objects:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    names = [o["metadata"]["name"] for o in by_kind(objects, kind)]
    raise AssertionError(f"no {kind} {name!r} rendered; {kind}s: {names}")


def pod_specs(objects: Sequence[Obj]) -> Iterator[tuple[str, Obj]]:
    """(``Kind/name``, pod spec) of every workload and bare Pod."""
    for o in objects:
        label = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield label, o["spec"]["template"]["spec"]
        elif o["kind"] == "Pod":
            yield label, o["spec"]


def env_of(container: Obj) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def mount_secrets(objects: list[Obj], deployment: str, root: Path) -> None:
    """Write the Secrets the Deployment mounts under root, as the kubelet would under /."""
    spec = find(objects, "Deployment", deployment)["spec"]["template"]["spec"]
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in spec["containers"][0]["volumeMounts"]:
        source = volumes[mount["name"]].get("secret")
        if source is None:
            continue
        directory = root / mount["mountPath"].lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        data = secrets[source["secretName"]]["data"]
        for item in source.get("items") or [{"key": key, "path": key} for key in data]:
            (directory / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))


def yaml_documents(directory: Path, pattern: str = "*.y*ml") -> list[Obj]:
    """Every non-empty YAML document of the directory's matching files, files in name order."""
    docs: list[Obj] = []
    for path in sorted(directory.glob(pattern)):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def chart_crds() -> list[Obj]:
    """The CRDs shipped in charts/kurrier/crds (written by the operator work)."""
    return yaml_documents(CHART_CRDS)
