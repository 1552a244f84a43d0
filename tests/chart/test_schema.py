"""Wrong values fail `helm template` (and so `helm install`) with a message naming the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.chart import HelmError, Scenario, by_kind, env_of, find, render
from tests.support.kube import Obj

SCHEMA_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown-top-level", {"replicas": 3}, ["additional properties 'replicas' not allowed"]),
    (
        "typo-in-nats",
        {"nats": {"replicass": 3}},
        ["at '/nats'", "additional properties 'replicass' not allowed"],
    ),
    ("negative-replicas", {"ingress": {"replicas": -1}}, ["at '/ingress/replicas'", "minimum"]),
    ("even-nats-cluster", {"nats": {"replicas": 2}}, ["at '/nats/replicas'", "1, 3, 5"]),
    (
        "service-type",
        {"ingress": {"service": {"type": "Ingress"}}},
        ["at '/ingress/service/type'", "'ClusterIP', 'NodePort', 'LoadBalancer'"],
    ),
    (
        "traffic-policy",
        {"ingress": {"service": {"externalTrafficPolicy": "local"}}},
        ["at '/ingress/service/externalTrafficPolicy'", "'Cluster', 'Local'"],
    ),
    (
        "privileged-container-port",
        {"ingress": {"ports": {"smtp": {"containerPort": 25}}}},
        ["at '/ingress/ports/smtp/containerPort'", "minimum"],
    ),
    (
        "node-port-range",
        {"ingress": {"ports": {"smtp": {"nodePort": 25}}}},
        ["at '/ingress/ports/smtp/nodePort'", "minimum"],
    ),
    (
        "sync-interval",
        {"nats": {"jetstream": {"syncInterval": "sometimes"}}},
        ["at '/nats/jetstream/syncInterval'", "does not match pattern"],
    ),
    (
        "batch-of-one",
        {"nats": {"atomicBatchMin": 1}},
        ["at '/nats/atomicBatchMin'"],
    ),
    (
        "duration",
        {"queue": {"minBackoff": "5 minutes"}},
        ["at '/queue/minBackoff'", "does not match pattern"],
    ),
    (
        "quantity",
        {"delivery": {"resources": {"requests": {"cpu": "lots"}}}},
        ["at '/delivery/resources/requests/cpu'"],
    ),
    (
        "resources-required",
        {"queue": {"resources": {"requests": None}}},
        ["at '/queue/resources'", "missing property 'requests'"],
    ),
    (
        "requests-need-cpu-and-memory",
        {"operator": {"resources": {"requests": {"cpu": None}}}},
        ["at '/operator/resources/requests'", "missing property 'cpu'"],
    ),
    ("log-level", {"logLevel": "verbose"}, ["at '/logLevel'", "'DEBUG', 'INFO'"]),
    (
        "nats-url-scheme",
        {"nats": {"external": {"url": "http://nats:4222"}}},
        ["at '/nats/external/url'", "does not match pattern"],
    ),
    (
        "stream-replicas",
        {"nats": {"external": {"streamReplicas": 2}}},
        ["at '/nats/external/streamReplicas'"],
    ),
    (
        "test-recipient",
        {"tests": {"recipient": "not-an-address"}},
        ["at '/tests/recipient'", "does not match pattern"],
    ),
    ("digest", {"image": {"digest": "sha256:abc"}}, ["at '/image/digest'"]),
    (
        "namespace-name",
        {"operator": {"namespaces": ["Bad_NS"]}},
        ["at '/operator/namespaces/0'", "does not match pattern"],
    ),
    (
        "relay-resource-without-spec",
        {"relayResources": {"routes": [{"name": "r"}]}},
        ["at '/relayResources/routes/0'", "missing property 'spec'"],
    ),
    (
        "relay-resource-name",
        {"relayResources": {"domains": [{"name": "Example.com", "spec": {}}]}},
        ["at '/relayResources/domains/0/name'"],
    ),
    ("metrics-port", {"metrics": {"port": 80}}, ["at '/metrics/port'", "minimum"]),
    (
        "boolean",
        {"ingress": {"autoscaling": {"enabled": "yes"}}},
        ["at '/ingress/autoscaling/enabled'", "want boolean"],
    ),
    (
        "anti-affinity",
        {"delivery": {"podAntiAffinity": "always"}},
        ["at '/delivery/podAntiAffinity'", "'soft', 'hard', 'none'"],
    ),
    (
        "probe-keys",
        {"queue": {"probes": {"liveness": {"periodSecond": 5}}}},
        ["at '/queue/probes/liveness'", "additional properties 'periodSecond' not allowed"],
    ),
    (
        "env-entry",
        {"extraEnv": [{"value": "x"}]},
        ["at '/extraEnv/0'", "missing property 'name'"],
    ),
    (
        "otlp-endpoint",
        {"telemetry": {"otlp": {"endpoint": "collector:4317"}}},
        ["at '/telemetry/otlp/endpoint'", "does not match pattern"],
    ),
]

# Consistency rules between several values, enforced by templates/validate.yaml.
TEMPLATE_CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "tls-without-certificate",
        {"ingress": {"tls": {"enabled": True}}},
        "ingress.tls.enabled needs a certificate",
    ),
    (
        "tls-two-sources",
        {
            "ingress": {
                "tls": {
                    "enabled": True,
                    "existingSecret": "x",
                    "certManager": {"enabled": True, "issuerRef": {"name": "i"}},
                }
            }
        },
        "set either existingSecret or certManager.enabled, not both",
    ),
    (
        "cert-manager-without-issuer",
        {
            "hostname": "mx.example.com",
            "ingress": {"tls": {"enabled": True, "certManager": {"enabled": True}}},
        },
        "needs ingress.tls.certManager.issuerRef.name",
    ),
    (
        "cert-manager-without-names",
        {
            "ingress": {
                "tls": {
                    "enabled": True,
                    "certManager": {"enabled": True, "issuerRef": {"name": "i"}},
                }
            }
        },
        "needs ingress.tls.certManager.dnsNames or hostname",
    ),
    (
        "smtps-without-tls",
        {"ingress": {"ports": {"smtps": {"enabled": True}}}},
        "ingress.ports.smtps.enabled (implicit TLS, port 465) needs ingress.tls.enabled",
    ),
    (
        "no-smtp-port",
        {"ingress": {"ports": {"smtp": {"enabled": False}, "submission": {"enabled": False}}}},
        "enable at least one of smtp, submission, smtps",
    ),
    (
        "local-traffic-policy-on-cluster-ip",
        {"ingress": {"service": {"externalTrafficPolicy": "Local"}}},
        "externalTrafficPolicy=Local needs ingress.service.type NodePort or LoadBalancer",
    ),
    (
        "autoscaling-bounds",
        {"delivery": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "delivery.autoscaling.minReplicas (5) is greater than maxReplicas (2)",
    ),
    (
        "nats-credentials-without-url",
        {"nats": {"external": {"credentials": {"secretName": "creds"}}}},
        "nats.external.credentials.secretName is only used with nats.external.url",
    ),
    (
        "nats-ca-without-url",
        {"nats": {"external": {"tls": {"caSecretName": "ca"}}}},
        "nats.external.tls.caSecretName is only used with nats.external.url",
    ),
]


def rejection(helm_bin: Path, values: dict[str, Any], tmp_path: Path) -> str:
    with pytest.raises(HelmError) as error:
        render(helm_bin, Scenario("bad", values), tmp_path)
    return str(error.value)


@pytest.mark.parametrize(
    ("name", "values", "expected"), SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES]
)
def test_schema_rejects(
    helm_bin: Path, name: str, values: dict[str, Any], expected: list[str], tmp_path: Path
) -> None:
    message = rejection(helm_bin, values, tmp_path)
    assert "values don't meet the specifications of the schema" in message, message
    for text in expected:
        assert text in message, message


@pytest.mark.parametrize(
    ("name", "values", "expected"), TEMPLATE_CASES, ids=[c[0] for c in TEMPLATE_CASES]
)
def test_template_rejects(
    helm_bin: Path, name: str, values: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    message = rejection(helm_bin, values, tmp_path)
    assert expected in message, message


KURRIER_SERVICES = ("ingress", "queue", "delivery", "operator")
DIGEST = "sha256:" + "a" * 64


def _container(objects: list[Obj], kind: str, name: str) -> Obj:
    obj = find(objects, kind, name)
    spec = obj["spec"] if kind == "Pod" else obj["spec"]["template"]["spec"]
    container: Obj = spec["containers"][0]
    return container


def test_good_values_render_into_what_they_say(helm_bin: Path, tmp_path: Path) -> None:
    """The counterpart of the cases above: near-identical but valid values render,
    and each lands where it should (a value accepted and then ignored would pass
    a test that only asks helm to exit 0)."""
    objects = render(
        helm_bin,
        Scenario(
            "good",
            {
                "nats": {"replicas": 5},
                "queue": {
                    "minBackoff": "1h30m",
                    "maxBackoff": "2h",
                    "probes": {"liveness": {"periodSeconds": 5}},
                },
                "ingress": {
                    "ports": {"smtp": {"nodePort": 30025}},
                    "service": {"type": "NodePort"},
                },
                "delivery": {"resources": {"requests": {"cpu": 0.5, "memory": "1Gi"}}},
                "tests": {"recipient": "postmaster@mail.example.org"},
                "image": {"digest": DIGEST},
                "operator": {"namespaces": ["mail-1"]},
                "telemetry": {"otlp": {"endpoint": "https://otel.example.com:4318"}},
            },
        ),
        tmp_path,
    )
    assert find(objects, "StatefulSet", "kurrier-nats")["spec"]["replicas"] == 5
    queue = _container(objects, "Deployment", "kurrier-queue")
    assert env_of(queue)["KURRIER_MIN_BACKOFF"] == "1h30m"
    assert env_of(queue)["KURRIER_MAX_BACKOFF"] == "2h"
    assert queue["livenessProbe"]["periodSeconds"] == 5
    ports = find(objects, "Service", "kurrier-ingress")["spec"]["ports"]
    assert [p.get("nodePort") for p in ports if p["name"] == "smtp"] == [30025]
    delivery = _container(objects, "Deployment", "kurrier-delivery")
    assert delivery["resources"]["requests"] == {"cpu": 0.5, "memory": "1Gi"}
    test_pod = _container(objects, "Pod", "kurrier-test-send-mail")
    assert env_of(test_pod)["RCPT_TO"] == "postmaster@mail.example.org"
    assert test_pod["image"].endswith(f"@{DIGEST}")
    operator = _container(objects, "Deployment", "kurrier-operator")
    assert env_of(operator)["KURRIER_NAMESPACES"] == "mail-1"
    assert [r["metadata"]["namespace"] for r in by_kind(objects, "Role")] == ["mail-1"]
    for service in KURRIER_SERVICES:
        container = _container(objects, "Deployment", f"kurrier-{service}")
        assert container["image"].endswith(f"@{DIGEST}"), service
        assert env_of(container)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "https://otel.example.com:4318"
        # Five NATS nodes: kurrier's streams get three replicas.
        assert env_of(container)["KURRIER_NATS_REPLICAS"] == "3", service


def test_good_external_nats_values_render_into_what_they_say(
    helm_bin: Path, tmp_path: Path
) -> None:
    """streamReplicas counts only with an external NATS (with the bundled one the
    chart decides): the valid counterpart of the stream-replicas case."""
    external = {"url": "nats://nats-0.infra:4222", "streamReplicas": 3}
    objects = render(
        helm_bin, Scenario("good-external", {"nats": {"external": external}}), tmp_path
    )
    assert by_kind(objects, "StatefulSet") == []
    for service in KURRIER_SERVICES:
        env = env_of(_container(objects, "Deployment", f"kurrier-{service}"))
        assert (env["KURRIER_NATS_URL"], env["KURRIER_NATS_REPLICAS"]) == (external["url"], "3")
