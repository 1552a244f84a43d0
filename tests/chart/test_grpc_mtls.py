"""gRPC mutual TLS as the chart renders it by default: the certificates it makes, mounted
where its Deployments say, run a real queue that answers ingress and the admin commands
what each may call, and refuses everyone else."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from kurrier.core.grpc_tls import (
    ADMIN_IDENTITY,
    INGRESS_IDENTITY,
    QUEUE_IDENTITY,
    QueueTls,
    queue_channel,
)
from kurrier.v1 import queue_pb2, queue_pb2_grpc

from tests.support.chart import (
    CHART,
    RELEASE,
    Scenario,
    by_kind,
    env_of,
    find,
    helm,
    mount_secrets,
    render,
)
from tests.support.kube import Api, Obj, TestCluster
from tests.support.nats import NatsServer
from tests.support.processes import free_port, kurrier_argv, stop_process, wait_until

MOUNTS = "/etc/kurrier"
# Default values but the bundled NATS's login and TLS (tests/chart/test_nats_security.py):
# the queue here uses a bare test NATS, and only gRPC's key material is looked at.
MTLS = Scenario("mtls", {"nats": {"auth": {"enabled": False}, "tls": {"enabled": False}}})


def _container(objects: list[Obj], name: str) -> Obj:
    container: Obj = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
    return container


def _env(container: Obj, root: Path, **overrides: str) -> dict[str, str]:
    """The container's KURRIER_* variables, with its mounts under root."""
    env = {
        name: value.replace(MOUNTS, f"{root}{MOUNTS}")
        for name, value in env_of(container).items()
        if name.startswith("KURRIER_")
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KURRIER_", "OTEL_"))}
    return {**clean, **env, **overrides}


def _list_status(address: str, tls: QueueTls | None) -> grpc.StatusCode:
    async def call() -> grpc.StatusCode:
        async with queue_channel(address, tls) as channel:
            stub = queue_pb2_grpc.QueueServiceStub(channel)
            try:
                await stub.ListMessages(queue_pb2.ListMessagesRequest(), timeout=15)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

    return asyncio.run(call())


def _client_tls(env: Mapping[str, str], server_name: str) -> QueueTls:
    return QueueTls(
        env["KURRIER_QUEUE_TLS_CA"],
        env["KURRIER_QUEUE_TLS_CERT"],
        env["KURRIER_QUEUE_TLS_KEY"],
        server_name,
    )


def test_default_values_run_the_queue_behind_mutual_tls(
    helm_bin: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    objects = render(helm_bin, MTLS, tmp_path)
    queue_root, ingress_root = tmp_path / "queue-pod", tmp_path / "ingress-pod"
    mount_secrets(objects, "kurrier-queue", queue_root)
    mount_secrets(objects, "kurrier-ingress", ingress_root)
    queue = _container(objects, "kurrier-queue")
    port = free_port()
    address = f"127.0.0.1:{port}"
    queue_env = _env(
        queue,
        queue_root,
        KURRIER_NATS_URL=nats_server.url,
        KURRIER_LISTEN=address,
        KURRIER_QUEUE_ADDRESS=address,
        KURRIER_METRICS_LISTEN="off",
        KURRIER_HOSTNAME="relay.test",
    )
    log = (tmp_path / "queue.log").open("ab")
    process = subprocess.Popen(kurrier_argv("queue"), env=queue_env, stdout=log, stderr=log)
    try:
        # Ingress dials kurrier-queue:7070 (its KURRIER_QUEUE_ADDRESS); here the queue
        # is on 127.0.0.1, so the client checks that name in the queue's certificate.
        ingress_env = _env(_container(objects, "kurrier-ingress"), ingress_root)
        assert ingress_env["KURRIER_QUEUE_ADDRESS"] == "kurrier-queue:7070"
        ingress_tls = _client_tls(ingress_env, "kurrier-queue")
        # Ingress's certificate is the queue's CA's, but it may not read the queue.
        wait_until(
            lambda: _list_status(address, ingress_tls) == grpc.StatusCode.PERMISSION_DENIED,
            30,
            "the queue to refuse ingress a listing",
        )
        # `kubectl exec deploy/kurrier-queue -- kurrier queue list`, as NOTES.txt says.
        listed = subprocess.run(
            kurrier_argv("queue", "list"), env=queue_env, capture_output=True, text=True, timeout=60
        )
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.strip() == "Mail queue is empty"
        # Anyone else gets nothing: in plaintext, or over TLS without a client certificate.
        assert _list_status(address, None) == grpc.StatusCode.UNAVAILABLE
        anonymous = QueueTls(ingress_tls.ca_file, server_name="kurrier-queue")
        assert _list_status(address, anonymous) == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_process(process)
        log.close()


def _common_name(encoded_pem: str) -> str:
    certificate = x509.load_pem_x509_certificate(base64.b64decode(encoded_pem))
    [name] = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(name.value)


def _mounted_secrets(objects: list[Obj]) -> set[str]:
    names = set()
    for deployment in ("kurrier-queue", "kurrier-ingress"):
        spec = find(objects, "Deployment", deployment)["spec"]["template"]["spec"]
        names |= {
            v["secret"]["secretName"] for v in spec["volumes"] if v["name"].startswith("grpc")
        }
    return names


def test_certificates_come_from_cert_manager_where_the_cluster_serves_it(
    helm_bin: Path, tmp_path: Path
) -> None:
    served = ["--api-versions", "cert-manager.io/v1/Certificate"]
    objects = render(helm_bin, MTLS, tmp_path, extra=served)
    certificates = {c["metadata"]["name"]: c["spec"] for c in by_kind(objects, "Certificate")}
    issued = {spec["secretName"] for spec in certificates.values() if not spec.get("isCA")}
    assert issued == _mounted_secrets(objects)
    rendered = {s["metadata"]["name"] for s in by_kind(objects, "Secret")}
    assert not rendered & issued, "cert-manager's Secrets are not the release's"
    queue = certificates["kurrier-queue-grpc-tls"]
    assert "kurrier-queue" in queue["dnsNames"] and queue["usages"][0] == "server auth"
    assert certificates["kurrier-ingress-grpc-tls"]["usages"][0] == "client auth"

    # Without cert-manager the chart makes them, and the Secrets hold what is mounted.
    objects = render(helm_bin, MTLS, tmp_path)
    assert not by_kind(objects, "Certificate")
    assert _mounted_secrets(objects) <= {s["metadata"]["name"] for s in by_kind(objects, "Secret")}


def test_each_certificate_names_its_party_whatever_the_release_is_called(
    helm_bin: Path, tmp_path: Path
) -> None:
    """The queue knows its clients by their certificates' Common Names, which do not
    follow the release's name: both issuers write the same ones."""
    identities = {
        "mail-kurrier-queue-grpc-tls": QUEUE_IDENTITY,
        "mail-kurrier-ingress-grpc-tls": INGRESS_IDENTITY,
        "mail-kurrier-queue-admin-grpc-tls": ADMIN_IDENTITY,
    }
    served = ["--api-versions", "cert-manager.io/v1/Certificate"]
    objects = render(helm_bin, Scenario("mtls"), tmp_path, extra=served, release="mail")
    certificates = {c["metadata"]["name"]: c["spec"] for c in by_kind(objects, "Certificate")}
    assert {name: certificates[name]["commonName"] for name in identities} == identities

    objects = render(helm_bin, Scenario("mtls"), tmp_path, release="mail")
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    made = {name: _common_name(secrets[name]["data"]["tls.crt"]) for name in identities}
    assert made == identities


def test_chart_made_certificates_are_kept_across_upgrades(
    helm_bin: Path, chart_cluster: TestCluster, crds: Api
) -> None:
    ns, env = "kurrier-mtls-upgrade", chart_cluster.env()
    crds.ensure_namespace(ns)
    chart_made = ["--set", "queue.mtls.certificates=chart"]
    helm(helm_bin, "install", RELEASE, str(CHART), "-n", ns, *chart_made, env=env)
    installed = _stored_certificates(crds, ns)
    assert set(installed) == {
        "kurrier-grpc-ca",
        "kurrier-queue-grpc-tls",
        "kurrier-ingress-grpc-tls",
        "kurrier-queue-admin-grpc-tls",
    }
    table_keys = crds.request("GET", f"/api/v1/namespaces/{ns}/secrets/kurrier-table-keys")
    helm(helm_bin, "upgrade", RELEASE, str(CHART), "-n", ns, *chart_made, env=env)
    assert _stored_certificates(crds, ns) == installed
    # So are the routing table keys: new ones would not open the table stored.
    kept = crds.request("GET", f"/api/v1/namespaces/{ns}/secrets/kurrier-table-keys")
    assert kept.body["data"] == table_keys.body["data"]

    # A Secret gone is made again, by the same CA: the others still trust it.
    gone = crds.request("DELETE", f"/api/v1/namespaces/{ns}/secrets/kurrier-ingress-grpc-tls")
    assert gone.status == 200, gone
    helm(helm_bin, "upgrade", RELEASE, str(CHART), "-n", ns, *chart_made, env=env)
    again = _stored_certificates(crds, ns)
    assert again["kurrier-ingress-grpc-tls"] != installed["kurrier-ingress-grpc-tls"]
    assert {k: v for k, v in again.items() if k != "kurrier-ingress-grpc-tls"} == {
        k: v for k, v in installed.items() if k != "kurrier-ingress-grpc-tls"
    }

    # A certificate an older chart made, named after the release and not annotated
    # with its identity, is made again with the identity the queue authorises.
    admin = f"/api/v1/namespaces/{ns}/secrets/kurrier-queue-admin-grpc-tls"
    unmarked = {"metadata": {"annotations": None}}
    patched = crds.request("PATCH", admin, unmarked, content_type="application/merge-patch+json")
    assert patched.status == 200, patched
    helm(helm_bin, "upgrade", RELEASE, str(CHART), "-n", ns, *chart_made, env=env)
    renewed = _stored_certificates(crds, ns)["kurrier-queue-admin-grpc-tls"]
    assert renewed != again["kurrier-queue-admin-grpc-tls"]
    assert _common_name(renewed) == ADMIN_IDENTITY
    helm(helm_bin, "uninstall", RELEASE, "-n", ns, env=env)


def _stored_certificates(api: Api, namespace: str) -> dict[str, str]:
    """tls.crt of each kubernetes.io/tls Secret in the namespace, by Secret name."""
    secrets = api.request("GET", f"/api/v1/namespaces/{namespace}/secrets").body["items"]
    return {
        s["metadata"]["name"]: s["data"]["tls.crt"]
        for s in secrets
        if s["type"] == "kubernetes.io/tls"
    }
