"""Rendering charts/kurrier with a real helm, and talking to a real kube-apiserver.

A :class:`Scenario` is one value set the chart must handle; :func:`render`
runs ``helm template`` on it and returns the objects. :class:`Api` is a tiny
client (urllib + bearer token) with the calls the chart tests need: discovery,
server-side dry runs with strict field validation, and waiting for CRDs.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kurrier"
CHART_CRDS = CHART / "crds"
DEV_VALUES = CHART / "values-dev.yaml"
# Stand-ins for third-party CRDs the chart can render objects of (cert-manager,
# Prometheus Operator): typed where the chart relies on a field, open elsewhere.
THIRD_PARTY_CRDS = Path(__file__).resolve().parent / "crds"

Obj = dict[str, Any]
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
            "delivery": {
                "autoscaling": {"enabled": True},
                "caBundle": {"configMapName": "corporate-ca"},
            },
            "operator": {"namespaces": ["mail-a", "mail-b"], "replicas": 2},
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
            "nats": {"pdb": {"enabled": False}},
            "ingress": {"pdb": {"enabled": False}, "ports": {"submission": {"enabled": False}}},
            "queue": {"pdb": {"enabled": False}},
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


def chart_crds() -> list[Obj]:
    """The CRDs shipped in charts/kurrier/crds (written by the operator work)."""
    docs: list[Obj] = []
    for path in sorted(CHART_CRDS.glob("*.y*ml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def third_party_crds() -> list[Obj]:
    docs: list[Obj] = []
    for path in sorted(THIRD_PARTY_CRDS.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


# --------------------------------------------------------------------------- API


@dataclass
class Response:
    status: int
    body: Obj
    warnings: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        return str(self.body.get("message", self.body))


class Api:
    """Just enough of a Kubernetes client: JSON over HTTPS with a bearer token."""

    def __init__(self, server: str, token: str, context: ssl.SSLContext) -> None:
        self.server = server
        self.token = token
        self.context = context
        self._resources: dict[tuple[str, str], tuple[str, bool]] = {}

    def request(
        self,
        method: str,
        path: str,
        body: Obj | None = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Response:
        url = self.server + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.context) as resp:
                warnings = resp.headers.get_all("Warning") or []
                return Response(resp.status, json.loads(resp.read() or b"{}"), warnings)
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                decoded: Obj = json.loads(raw)
            except ValueError:
                decoded = {"message": raw.decode(errors="replace")}
            return Response(error.code, decoded)

    # -- discovery

    def _discover(self, api_version: str) -> None:
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        resp = self.request("GET", path)
        if resp.status != 200:
            return
        for r in resp.body.get("resources", []):
            if "/" not in r["name"]:
                self._resources[(api_version, r["kind"])] = (r["name"], r["namespaced"])

    def resource(self, api_version: str, kind: str) -> tuple[str, bool] | None:
        """(plural, namespaced) of a kind, from discovery; None if the server lacks it."""
        if (api_version, kind) not in self._resources:
            self._discover(api_version)
        return self._resources.get((api_version, kind))

    def collection_path(self, obj: Obj, namespace: str | None = None) -> str:
        api_version, kind = obj["apiVersion"], obj["kind"]
        found = self.resource(api_version, kind)
        if found is None:
            raise AssertionError(f"the API server does not serve {kind} ({api_version})")
        plural, namespaced = found
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        if namespaced:
            ns = namespace or obj["metadata"].get("namespace") or "default"
            return f"{base}/namespaces/{ns}/{plural}"
        return f"{base}/{plural}"

    # -- writes

    def create(self, obj: Obj, *, dry_run: bool) -> Response:
        """POST the object, strict about unknown fields; optionally only as a dry run."""
        params = {"fieldValidation": "Strict"}
        if dry_run:
            params["dryRun"] = "All"
        return self.request("POST", self.collection_path(obj), obj, params)

    def ensure_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        """Create a namespace for real (it may exist already), with these labels."""
        metadata: Obj = {"name": name, "labels": dict(labels or {})}
        resp = self.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata},
        )
        if resp.status == 409 and labels:
            resp = self.request(
                "PATCH",
                f"/api/v1/namespaces/{name}",
                {"metadata": {"labels": dict(labels)}},
                content_type="application/merge-patch+json",
            )
        if resp.status not in (200, 201, 409):
            raise AssertionError(f"creating namespace {name}: {resp.status} {resp.message}")

    def install_crd(self, crd: Obj, timeout: float = 60.0) -> None:
        """Create a CRD for real (dry run first) and wait until its kind is served."""
        name = crd["metadata"]["name"]
        dry = self.create(crd, dry_run=True)
        if dry.status not in (200, 201, 409):
            raise AssertionError(f"CRD {name} rejected: {dry.status} {dry.message}")
        real = self.create(crd, dry_run=False)
        if real.status not in (200, 201, 409):
            raise AssertionError(f"CRD {name} not created: {real.status} {real.message}")
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"]
        versions = [v["name"] for v in crd["spec"]["versions"] if v.get("served", True)]
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            got = self.request(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            )
            conditions = (got.body.get("status") or {}).get("conditions") or []
            established = any(
                c["type"] == "Established" and c["status"] == "True" for c in conditions
            )
            if established and all(self._served_now(f"{group}/{v}", kind) for v in versions):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"CRD {name} not established and served in {timeout}s")
            time.sleep(delay)  # poll back-off, bounded by the deadline
            delay = min(delay * 2, 0.5)

    def _served_now(self, api_version: str, kind: str) -> bool:
        self._discover(api_version)
        return (api_version, kind) in self._resources
