"""helm lint --strict and helm template over the value sets, and what each renders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.chart import (
    CHART,
    SCENARIOS,
    Scenario,
    by_kind,
    env_of,
    find,
    helm,
    pod_specs,
    render,
    scenario,
    values_args,
)
from tests.support.kube import Obj

COMPONENTS = ("ingress", "queue", "delivery", "operator")


def container(objects: list[Obj], kind: str, name: str) -> Obj:
    workload = find(objects, kind, name)
    containers: list[Obj] = workload["spec"]["template"]["spec"]["containers"]
    return containers[0]


@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_lint_strict(helm_bin: Path, s: Scenario, tmp_path: Path) -> None:
    out = helm(helm_bin, "lint", "--strict", str(CHART), *values_args(s, tmp_path))
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_template_renders_unique_named_objects(helm_bin: Path, s: Scenario, tmp_path: Path) -> None:
    objects = render(helm_bin, s, tmp_path)
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects: {sorted(keys)}"
    for o in objects:
        labels = o["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == "kurrier", o["metadata"]
        assert labels.get("app.kubernetes.io/part-of") == "kurrier", o["metadata"]
        if o["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"].get("namespace"), f"{o['kind']} {o['metadata']['name']}"
        assert len(o["metadata"]["name"]) <= 63, o["metadata"]["name"]


def test_defaults(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, scenario("defaults"), tmp_path)
    for component in COMPONENTS:
        c = container(objects, "Deployment", f"kurrier-{component}")
        assert c["args"] == [component]
        env = env_of(c)
        # NATS with a login per component, over TLS.
        assert env["KURRIER_NATS_URL"] == "tls://kurrier-nats:4222"
        assert env["KURRIER_NATS_USER"] == component
        assert env["KURRIER_NATS_PASSWORD_FILE"] == "/etc/kurrier/nats-auth/password"
        assert env["KURRIER_NATS_TLS_CA"] == "/etc/kurrier/nats-tls/ca.crt"
        assert env["KURRIER_NATS_REPLICAS"] == "1"
        assert env["KURRIER_METRICS_LISTEN"] == "0.0.0.0:9090"
        assert env["OTEL_SERVICE_NAME"] == f"kurrier-{component}"
        assert env["OTEL_SDK_DISABLED"] == "true"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= c.keys()
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]

    ingress = container(objects, "Deployment", "kurrier-ingress")
    env = env_of(ingress)
    assert env["KURRIER_SMTP"] == "0.0.0.0:2525"
    assert env["KURRIER_SUBMISSION"] == "0.0.0.0:2587"
    assert "KURRIER_SMTPS" not in env and "KURRIER_TLS_CERT" not in env
    assert env["KURRIER_QUEUE_ADDRESS"] == "kurrier-queue:7070"
    assert ingress["livenessProbe"]["tcpSocket"]["port"] == "smtp"
    assert ingress["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}

    queue = container(objects, "Deployment", "kurrier-queue")
    assert env_of(queue)["KURRIER_LISTEN"] == "0.0.0.0:7070"
    # The kubelet's gRPC probe has no client certificate for the mTLS port.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert queue[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe

    for component in ("delivery", "operator"):
        c = container(objects, "Deployment", f"kurrier-{component}")
        assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert "KURRIER_PLATFORM_NAMESPACE" not in env_of(
        container(objects, "Deployment", "kurrier-operator")
    ), "no tenancy unless asked for"

    service = find(objects, "Service", "kurrier-ingress")
    assert service["spec"]["type"] == "ClusterIP"
    assert "externalTrafficPolicy" not in service["spec"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("smtp", 25, "smtp"),
        ("submission", 587, "submission"),
    ]

    nats = find(objects, "StatefulSet", "kurrier-nats")
    assert nats["spec"]["replicas"] == 1
    assert nats["spec"]["serviceName"] == "kurrier-nats-headless"
    assert find(objects, "Service", "kurrier-nats-headless")["spec"]["clusterIP"] == "None"
    conf = find(objects, "ConfigMap", "kurrier-nats")["data"]["nats.conf"]
    assert "jetstream {" in conf and "cluster {" not in conf
    assert "include ./auth.conf" in conf and "tls {" in conf
    assert find(objects, "Secret", "kurrier-nats-auth")["type"] == "Opaque"
    assert find(objects, "Secret", "kurrier-nats-tls")["type"] == "kubernetes.io/tls"

    kinds = {o["kind"] for o in objects}
    assert {"NetworkPolicy", "PodDisruptionBudget", "ClusterRole", "Pod"} <= kinds
    assert not kinds & {"HorizontalPodAutoscaler", "ServiceMonitor", "Certificate", "RelayRoute"}
    # PDBs for the four components; none for a single NATS server.
    assert sorted(p["metadata"]["name"] for p in by_kind(objects, "PodDisruptionBudget")) == [
        f"kurrier-{c}" for c in sorted(COMPONENTS)
    ]


def test_external_nats(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, scenario("external-nats"), tmp_path)
    assert not by_kind(objects, "StatefulSet")
    assert not [o for o in objects if o["metadata"]["name"].startswith("kurrier-nats")]
    # The user's NATS, the user's login: none of the bundled NATS's.
    assert not any("KURRIER_NATS_USER" in str(o) or "nats-tls" in str(o) for o in objects)
    for component in COMPONENTS:
        deployment = find(objects, "Deployment", f"kurrier-{component}")
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        env = env_of(c)
        assert env["KURRIER_NATS_URL"] == "nats://nats-0.infra:4222,nats://nats-1.infra:4222"
        assert env["KURRIER_NATS_REPLICAS"] == "3"
        assert env["KURRIER_NATS_CREDS"] == "/etc/kurrier/nats/user.creds"
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        creds = next(v for v in volumes if v["name"] == "nats-credentials")
        assert creds["secret"]["secretName"] == "kurrier-nats-creds"
        mount = next(m for m in c["volumeMounts"] if m["name"] == "nats-credentials")
        assert mount == {
            "name": "nats-credentials",
            "mountPath": "/etc/kurrier/nats",
            "readOnly": True,
        }


def test_external_nats_with_its_own_ca(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, scenario("external-nats-tls"), tmp_path)
    for component in COMPONENTS:
        deployment = find(objects, "Deployment", f"kurrier-{component}")
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        env = env_of(c)
        assert env["KURRIER_NATS_URL"] == "tls://nats.infra:4222"
        assert env["KURRIER_NATS_TLS_CA"] == "/etc/kurrier/nats-tls/ca.crt"
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        ca = next(v for v in volumes if v["name"] == "nats-ca")
        assert ca["secret"]["secretName"] == "infra-nats-ca"
        assert ca["secret"]["items"] == [{"key": "root.pem", "path": "ca.crt"}]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "nats-ca")
        assert mount["mountPath"] == "/etc/kurrier/nats-tls"


def test_three_node_nats(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, scenario("nats-cluster"), tmp_path)
    nats = find(objects, "StatefulSet", "kurrier-nats")
    assert nats["spec"]["replicas"] == 3
    assert nats["spec"]["podManagementPolicy"] == "Parallel"
    claim = nats["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == "fast-ssd"
    assert claim["resources"]["requests"]["storage"] == "20Gi"
    conf = find(objects, "ConfigMap", "kurrier-nats")["data"]["nats.conf"]
    for i in range(3):
        assert f"nats://kurrier-nats-{i}.kurrier-nats-headless:6222" in conf
    assert find(objects, "Service", "kurrier-nats-headless")["spec"]["publishNotReadyAddresses"]
    assert find(objects, "PodDisruptionBudget", "kurrier-nats")["spec"]["maxUnavailable"] == 1
    for component in COMPONENTS:
        env = env_of(container(objects, "Deployment", f"kurrier-{component}"))
        assert env["KURRIER_NATS_REPLICAS"] == "3"


def test_tls_from_existing_secret(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, scenario("tls"), tmp_path)
    deployment = find(objects, "Deployment", "kurrier-ingress")
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    env = env_of(c)
    assert env["KURRIER_SMTPS"] == "0.0.0.0:2465"
    assert env["KURRIER_TLS_CERT"] == "/etc/kurrier/tls/tls.crt"
    assert env["KURRIER_TLS_KEY"] == "/etc/kurrier/tls/tls.key"
    assert env["KURRIER_HOSTNAME"] == "mx.example.com"
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "tls")["secret"]["secretName"] == (
        "mx-example-com-tls"
    )
    assert {"name": "tls", "mountPath": "/etc/kurrier/tls", "readOnly": True} in c["volumeMounts"]
    assert not by_kind(objects, "Certificate")
    service = find(objects, "Service", "kurrier-ingress")["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["externalTrafficPolicy"] == "Local"
    assert service["loadBalancerSourceRanges"] == ["192.0.2.0/24"]
    assert [p["port"] for p in service["ports"]] == [25, 587, 465]


def test_everything_on(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, scenario("everything-on"), tmp_path)
    cert = find(objects, "Certificate", "kurrier-ingress")["spec"]
    assert cert["secretName"] == "kurrier-ingress-tls"
    assert cert["dnsNames"] == ["mx.example.com"]
    assert cert["issuerRef"] == {
        "name": "letsencrypt",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    ingress = find(objects, "Deployment", "kurrier-ingress")
    assert "replicas" not in ingress["spec"], "the HPA owns the replica count"
    hpas = {h["metadata"]["name"]: h["spec"] for h in by_kind(objects, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"kurrier-ingress", "kurrier-delivery"}
    assert [m["resource"]["name"] for m in hpas["kurrier-ingress"]["metrics"]] == ["cpu", "memory"]
    assert hpas["kurrier-delivery"]["scaleTargetRef"]["name"] == "kurrier-delivery"

    env = env_of(ingress["spec"]["template"]["spec"]["containers"][0])
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert "OTEL_SDK_DISABLED" not in env
    assert "deployment.environment=test" in env["OTEL_RESOURCE_ATTRIBUTES"]
    assert env["EXTRA"] == "1"

    delivery = container(objects, "Deployment", "kurrier-delivery")
    assert env_of(delivery)["KURRIER_TLS_CA_FILE"] == "/etc/kurrier/ca/ca.crt"

    monitor = find(objects, "ServiceMonitor", "kurrier-metrics")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    metrics_service = find(objects, "Service", "kurrier-metrics")
    assert metrics_service["spec"]["clusterIP"] == "None"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "metrics"
    assert selector.items() <= metrics_service["metadata"]["labels"].items()

    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["mail-a", "mail-b"]
    assert [r["metadata"]["name"] for r in by_kind(objects, "ClusterRole")] == [
        "kurrier-everything-on-kurrier-ingress"  # TokenReview only; the operator has Roles
    ]
    operator = container(objects, "Deployment", "kurrier-operator")
    assert env_of(operator)["KURRIER_NAMESPACES"] == "mail-a,mail-b"
    # Tenancy with the release's namespace as the platform's.
    assert env_of(operator)["KURRIER_PLATFORM_NAMESPACE"] == "kurrier-everything-on"

    routes = {r["metadata"]["name"]: r["spec"] for r in by_kind(objects, "RelayRoute")}
    assert routes["kurrier-dev-sink"]["destination"]["smarthost"] == {
        "host": "kurrier-sink.kurrier-everything-on.svc",
        "port": 2526,
    }
    assert "everything-by-mx" in routes
    assert [d["metadata"]["name"] for d in by_kind(objects, "RelayDomain")] == ["example-com"]
    assert [p["metadata"]["name"] for p in by_kind(objects, "RelayPolicy")] == ["default"]


def test_everything_off(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, scenario("everything-off"), tmp_path)
    kinds = {o["kind"] for o in objects}
    assert not kinds & {
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Pod",
        "HorizontalPodAutoscaler",
    }
    names = sorted(o["metadata"]["name"] for o in by_kind(objects, "Deployment"))
    assert names == ["kurrier-delivery", "kurrier-ingress", "kurrier-queue"]
    service = find(objects, "Service", "kurrier-ingress")
    assert [p["name"] for p in service["spec"]["ports"]] == ["smtp"]
    for _, spec in pod_specs(objects):
        assert "prometheus.io/scrape" not in str(spec)
    for d in by_kind(objects, "Deployment"):
        assert "prometheus.io/scrape" not in d["spec"]["template"]["metadata"]["annotations"]


def test_network_policies(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, scenario("defaults"), tmp_path)
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(objects, "NetworkPolicy")}
    assert set(policies) == {f"kurrier-{c}" for c in (*COMPONENTS, "nats")}
    for spec in policies.values():
        assert spec["policyTypes"] == ["Ingress"]

    ingress_rules = policies["kurrier-ingress"]["ingress"]
    smtp_rule = ingress_rules[0]
    assert "from" not in smtp_rule, "SMTP is open to anywhere by default"
    assert [p["port"] for p in smtp_rule["ports"]] == ["smtp", "submission"]

    queue_rules = policies["kurrier-queue"]["ingress"]
    assert queue_rules[0]["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert queue_rules[0]["from"] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "kurrier",
                    "app.kubernetes.io/instance": "kurrier",
                    "app.kubernetes.io/component": "ingress",
                }
            }
        }
    ]
    nats_rules = policies["kurrier-nats"]["ingress"]
    client = nats_rules[0]
    selector = client["from"][0]["podSelector"]
    assert selector["matchExpressions"][0]["values"] == list(COMPONENTS)
    # Metrics: only from the configured namespace, on every component.
    for name in (f"kurrier-{c}" for c in COMPONENTS):
        metrics = policies[name]["ingress"][-1]
        assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
        ns_selector = metrics["from"][0]["namespaceSelector"]
        assert ns_selector["matchExpressions"] == [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring"]}
        ]


def test_restricted_smtp_sources_keep_the_helm_test_reachable(
    helm_bin: Path, tmp_path: Path
) -> None:
    objects = render(helm_bin, scenario("everything-on"), tmp_path)
    policy = find(objects, "NetworkPolicy", "kurrier-ingress")["spec"]
    peers = policy["ingress"][0]["from"]
    assert {"ipBlock": {"cidr": "10.0.0.0/8"}} in peers
    test_pod = by_kind(objects, "Pod")[0]
    test_labels = test_pod["metadata"]["labels"]
    assert any(
        p.get("podSelector", {}).get("matchLabels", {}).items() <= test_labels.items()
        and "podSelector" in p
        for p in peers
    )


def test_operator_rbac_is_least_privilege(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, scenario("defaults"), tmp_path)
    roles = by_kind(objects, "ClusterRole") + by_kind(objects, "Role")
    assert len(roles) == 1
    rules = roles[0]["rules"]
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    kinds = ("relaydomains", "relayroutes", "relaypolicies")
    # Exactly what the operator uses (tests/operator runs it under this role).
    expected = {("kurrier.io", k, v) for k in kinds for v in ("list", "watch")}
    expected |= {("kurrier.io", f"{k}/status", "patch") for k in kinds}
    expected |= {("", "secrets", v) for v in ("list", "watch")}
    expected |= {("", "events", "create")}
    assert granted == expected
    binding = by_kind(objects, "ClusterRoleBinding")[0]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kurrier-operator", "namespace": "kurrier-defaults"}
    ]
    accounts = {a["metadata"]["name"]: a for a in by_kind(objects, "ServiceAccount")}
    assert accounts["kurrier-operator"]["automountServiceAccountToken"] is True
    for name in ("kurrier-ingress", "kurrier-queue", "kurrier-delivery", "kurrier-nats"):
        assert accounts[name]["automountServiceAccountToken"] is False, name


def test_token_review_grants_ingress_one_verb(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, scenario("everything-on"), tmp_path)
    role = find(objects, "ClusterRole", "kurrier-everything-on-kurrier-ingress")
    assert role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
    binding = find(objects, "ClusterRoleBinding", "kurrier-everything-on-kurrier-ingress")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kurrier-ingress", "namespace": "kurrier-everything-on"}
    ]
    pod = find(objects, "Deployment", "kurrier-ingress")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    assert find(objects, "ServiceAccount", "kurrier-ingress")["automountServiceAccountToken"]
    for name in ("kurrier-queue", "kurrier-delivery"):
        assert find(objects, "ServiceAccount", name)["automountServiceAccountToken"] is False


def test_bundled_nats_supports_message_schedules(helm_bin: Path, tmp_path: Path) -> None:
    """The queue schedules retries with JetStream message schedules: nats-server 2.12+."""
    objects = render(helm_bin, scenario("defaults"), tmp_path)
    image = container(objects, "StatefulSet", "kurrier-nats")["image"]
    repository, _, tag = image.partition(":")
    assert repository == "nats"
    major, minor = (int(part) for part in tag.split("-")[0].split(".")[:2])
    assert (major, minor) >= (2, 12), image


def test_dev_values_wire_the_sink(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, scenario("dev"), tmp_path)
    sink = container(objects, "Deployment", "kurrier-sink")
    assert sink["args"] == ["sink", "--listen", "0.0.0.0:2526", "--dir", "/tmp/sink"]
    assert find(objects, "Service", "kurrier-sink")["spec"]["ports"][0]["port"] == 2526
    route = find(objects, "RelayRoute", "kurrier-dev-sink")["spec"]
    assert route["destination"]["smarthost"]["host"] == "kurrier-sink.kurrier-dev.svc"
    assert route["match"]["recipientDomains"] == ["*"]
    assert find(objects, "StatefulSet", "kurrier-nats")["spec"]["replicas"] == 1
    assert not by_kind(objects, "Pod"), "no helm test hook under Tilt"
