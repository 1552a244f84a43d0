"""A real, throw-away Kubernetes API server for tests (like controller-runtime's envtest),
and :class:`Api`, just enough of a client to talk to it.

``start_test_cluster(workdir)`` starts etcd and kube-apiserver on free loopback
ports, with everything they write kept under ``workdir``:

- etcd: data dir ``workdir/etcd``, client and peer URLs on 127.0.0.1;
- kube-apiserver: secure port on 127.0.0.1 with a self-generated serving
  certificate (``--cert-dir``), a static token file holding one admin token in
  group ``system:masters``, ``--authorization-mode=RBAC``, and a freshly made RSA
  key for signing and verifying ServiceAccount tokens (so TokenRequest and
  TokenReview work). There are no controllers and no kubelet: nothing creates
  default ServiceAccounts, finishes namespace deletion or runs pods.

It waits until ``/readyz`` says ``ok``, writes a kubeconfig for the admin token
and yields a :class:`TestCluster`. On exit both processes are terminated and
waited for. Logs are in ``workdir/etcd.log`` and ``workdir/kube-apiserver.log``.

The binaries come from ``scripts/testbin.sh`` (built once into a cache outside
the repo; instant when cached).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.support import REPO
from tests.support.certs import private_pem, public_pem, rsa_key
from tests.support.processes import free_port

TESTBIN_SCRIPT = REPO / "scripts" / "testbin.sh"

#: Issuer of ServiceAccount tokens, also the audience the API server accepts.
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"

ADMIN_USER = "kurrier-test-admin"
STARTUP_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


class TestClusterError(RuntimeError):
    """The test cluster could not be started."""


@dataclass(frozen=True)
class TestCluster:
    """A running etcd + kube-apiserver pair.

    ``kubeconfig`` authenticates as an admin (group ``system:masters``) with
    ``token``; ``server`` is ``https://127.0.0.1:PORT``; ``bin_dir`` holds
    ``kube-apiserver``, ``etcd`` and ``helm``; ``ca_file`` verifies the API
    server's serving certificate.
    """

    __test__ = False  # not a pytest test class, despite the name

    kubeconfig: Path
    server: str
    token: str
    bin_dir: Path
    ca_file: Path

    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts the API server's certificate."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``KUBECONFIG`` pointing at this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def api(self, token: str | None = None) -> Api:
        """A client of this API server, as the admin or with another bearer token."""
        return Api(self.server, self.token if token is None else token, self.ssl_context())


@functools.cache
def testbin_dir() -> Path:
    """Run ``scripts/testbin.sh`` (building binaries if missing) and return the bin dir."""
    proc = subprocess.run(
        ["bash", str(TESTBIN_SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=None,  # build progress goes straight to our stderr
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise TestClusterError(f"{TESTBIN_SCRIPT} failed with exit code {proc.returncode}")
    bin_dir = Path(lines[-1])
    for name in ("kube-apiserver", "etcd", "helm"):
        if not os.access(bin_dir / name, os.X_OK):
            raise TestClusterError(f"{TESTBIN_SCRIPT} did not provide {bin_dir / name}")
    return bin_dir


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class _Process:
    """A child process whose output goes to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file: IO[bytes] = log.open("wb")
        self.popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise TestClusterError(
                f"{self.name} exited with code {code}; last lines of {self.log}:\n{_tail(self.log)}"
            )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log_file.close()


def _poll(ready: Callable[[], bool], deadline: float, failure: Callable[[], Exception]) -> None:
    """Call ``ready()`` until it is true; raise ``failure()`` once the deadline has passed."""
    delay = 0.05
    while not ready():
        if time.monotonic() > deadline:
            raise failure()
        time.sleep(delay)  # back-off between polls, not synchronisation
        delay = min(delay * 2, 0.5)


def _wait_until(
    what: str,
    ready: Callable[[], bool],
    proc: _Process,
    deadline: float,
) -> None:
    """Poll ``ready()`` until it is true, the process dies, or the deadline passes."""

    def alive_and_ready() -> bool:
        proc.check_alive()
        return ready()

    _poll(
        alive_and_ready,
        deadline,
        lambda: TestClusterError(
            f"{what} not ready in time; last lines of {proc.log}:\n{_tail(proc.log)}"
        ),
    )


def _http_ok(
    url: str,
    *,
    expect: bytes,
    token: str | None = None,
    context: ssl.SSLContext | None = None,
) -> bool:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            body: bytes = response.read()
            return response.status == 200 and expect in body
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def _write_kubeconfig(path: Path, server: str, token: str, ca_pem: bytes) -> None:
    # JSON is valid YAML, and kubectl, helm and kubernetes clients read it as such.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kurrier-test",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [
            {
                "name": "kurrier-test",
                "context": {"cluster": "kurrier-test", "user": ADMIN_USER, "namespace": "default"},
            }
        ],
        "current-context": "kurrier-test",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


@contextlib.contextmanager
def start_test_cluster(
    workdir: Path, *, extra_apiserver_args: Sequence[str] = ()
) -> Iterator[TestCluster]:
    """Start etcd and kube-apiserver under ``workdir``; yield a :class:`TestCluster`.

    ``extra_apiserver_args`` are appended to the kube-apiserver command line
    (later flags win), e.g. ``["--enable-admission-plugins=..."]``.
    """
    bin_dir = testbin_dir()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    token = secrets.token_urlsafe(32)
    tokens_csv = workdir / "tokens.csv"
    tokens_csv.write_text(f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
    tokens_csv.chmod(0o600)

    sa_key = workdir / "sa.key"
    sa_pub = workdir / "sa.pub"
    signing_key = rsa_key()
    sa_key.write_bytes(private_pem(signing_key))
    sa_pub.write_bytes(public_pem(signing_key))

    cert_dir = workdir / "apiserver-certs"
    cert_dir.mkdir(exist_ok=True)
    etcd_client = f"http://127.0.0.1:{free_port()}"
    etcd_peer = f"http://127.0.0.1:{free_port()}"
    port = free_port()
    server = f"https://127.0.0.1:{port}"

    procs: list[_Process] = []
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        etcd = _Process(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name=kurrier-test",
                f"--data-dir={workdir / 'etcd'}",
                f"--listen-client-urls={etcd_client}",
                f"--advertise-client-urls={etcd_client}",
                f"--listen-peer-urls={etcd_peer}",
                f"--initial-advertise-peer-urls={etcd_peer}",
                f"--initial-cluster=kurrier-test={etcd_peer}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            workdir / "etcd.log",
        )
        procs.append(etcd)
        _wait_until(
            "etcd",
            lambda: _http_ok(f"{etcd_client}/health", expect=b'"health":"true"'),
            etcd,
            deadline,
        )

        apiserver = _Process(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_client}",
                f"--cert-dir={cert_dir}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                f"--token-auth-file={tokens_csv}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
                # No controller-manager creates the "default" ServiceAccount, so this
                # admission plugin would reject every Pod.
                "--disable-admission-plugins=ServiceAccount",
                "--endpoint-reconciler-type=none",  # no kubernetes Service for 127.0.0.1
                "--allow-privileged=true",
                "--v=1",
                *extra_apiserver_args,
            ],
            workdir / "kube-apiserver.log",
        )
        procs.append(apiserver)

        ca_file = cert_dir / "apiserver.crt"
        context: list[ssl.SSLContext] = []

        def readyz() -> bool:
            if not context:
                if not ca_file.exists():
                    return False
                try:
                    context.append(ssl.create_default_context(cafile=str(ca_file)))
                except (ssl.SSLError, OSError):  # file still being written
                    return False
            return _http_ok(f"{server}/readyz", expect=b"ok", token=token, context=context[0])

        _wait_until("kube-apiserver /readyz", readyz, apiserver, deadline)

        kubeconfig = workdir / "kubeconfig"
        _write_kubeconfig(kubeconfig, server, token, ca_file.read_bytes())
        yield TestCluster(
            kubeconfig=kubeconfig,
            server=server,
            token=token,
            bin_dir=bin_dir,
            ca_file=ca_file,
        )
    finally:
        for proc in reversed(procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"tests.support.kube: stopping {proc.name}: {exc!r}", file=sys.stderr)


# --------------------------------------------------------------------------- API

Obj = dict[str, Any]


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
        accept: str = "application/json",
    ) -> Response:
        url = self.server + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", accept)
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

        def established_and_served() -> bool:
            got = self.request(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            )
            conditions = (got.body.get("status") or {}).get("conditions") or []
            established = any(
                c["type"] == "Established" and c["status"] == "True" for c in conditions
            )
            return established and all(self._served_now(f"{group}/{v}", kind) for v in versions)

        _poll(
            established_and_served,
            time.monotonic() + timeout,
            lambda: AssertionError(f"CRD {name} not established and served in {timeout}s"),
        )

    def _served_now(self, api_version: str, kind: str) -> bool:
        self._discover(api_version)
        return (api_version, kind) in self._resources
