"""A real kube-apiserver accepts everything the chart renders (server-side dry run,
strict field validation), `helm install`/`upgrade`/`uninstall` work against it,
and the operator's RBAC grants exactly what it needs."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from kurrier.cli.main import build_parser

from tests.support.chart import (
    CHART,
    CHART_CRDS,
    RELEASE,
    SCENARIOS,
    Scenario,
    by_kind,
    chart_crds,
    helm,
    render,
)
from tests.support.kube import Api, TestCluster

NATS_SECRETS = ("kurrier-nats-auth", "kurrier-nats-tls")
RELAY_KINDS = {"RelayDomain", "RelayRoute", "RelayPolicy"}
RESTRICTED = {
    f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")
}


def test_chart_ships_the_relay_crds() -> None:
    crds = chart_crds()
    kinds = {crd["spec"]["names"]["kind"] for crd in crds}
    assert kinds >= RELAY_KINDS, f"{CHART_CRDS} must hold CRDs for {sorted(RELAY_KINDS)}"
    for crd in crds:
        assert crd["kind"] == "CustomResourceDefinition"
        assert crd["spec"]["group"] == "kurrier.io"
        assert crd["spec"]["scope"] == "Namespaced"


@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_server_side_dry_run_accepts_every_object(
    helm_bin: Path, crds: Api, s: Scenario, tmp_path: Path
) -> None:
    api = crds
    objects = render(helm_bin, s, tmp_path, include_crds=True)

    # helm passes the CRDs through unchanged; the `crds` fixture created them
    # for real (after a dry run), as custom resources can only be checked then.
    rendered_crds = by_kind(objects, "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in rendered_crds) == sorted(
        c["metadata"]["name"] for c in chart_crds()
    )
    others = [o for o in objects if o["kind"] != "CustomResourceDefinition"]

    # The API server's own Pod Security admission, at the "restricted" level,
    # rejects non-compliant Pods and warns about non-compliant workloads.
    namespaces = {o["metadata"]["namespace"] for o in others if "namespace" in o["metadata"]}
    for namespace in sorted(namespaces):
        api.ensure_namespace(namespace, RESTRICTED)

    failures = []
    for obj in others:
        resp = api.create(obj, dry_run=True)
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if resp.status != 201:
            failures.append(f"{what}: {resp.status} {resp.message}")
        failures += [f"{what}: warning: {w}" for w in resp.warnings]
    assert failures == []


def test_dry_run_rejects_a_broken_object(crds: Api) -> None:
    """The check has teeth: a typo in a field is refused under strict validation."""
    crds.ensure_namespace("kurrier-broken")
    broken = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "broken", "namespace": "kurrier-broken"},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {
                "metadata": {"labels": {"app": "x"}},
                "spec": {
                    "containers": [
                        {"name": "x", "image": "x:1", "imagePullPolicy": "Sometimes", "portz": []}
                    ]
                },
            },
        },
    }
    resp = crds.create(broken, dry_run=True)
    assert resp.status in (400, 422), resp
    assert "portz" in resp.message or "imagePullPolicy" in resp.message, resp.message


def test_pod_security_admission_has_teeth(helm_bin: Path, crds: Api, tmp_path: Path) -> None:
    """Loosened security values make the restricted namespace refuse the test Pod."""
    loose = Scenario(
        "loose",
        {"containerSecurityContext": {"allowPrivilegeEscalation": True, "capabilities": None}},
    )
    objects = render(helm_bin, loose, tmp_path)
    crds.ensure_namespace(loose.namespace, RESTRICTED)
    resp = crds.create(by_kind(objects, "Pod")[0], dry_run=True)
    assert resp.status == 403, resp
    assert "violates PodSecurity" in resp.message, resp.message
    deployment = crds.create(by_kind(objects, "Deployment")[0], dry_run=True)
    assert deployment.status == 201, deployment
    assert any("allowPrivilegeEscalation" in w for w in deployment.warnings), deployment.warnings


def test_relay_crs_are_validated_by_their_crds(crds: Api) -> None:
    crds.ensure_namespace("kurrier-crs")
    bad_route = {
        "apiVersion": "kurrier.io/v1alpha1",
        "kind": "RelayRoute",
        "metadata": {"name": "bad", "namespace": "kurrier-crs"},
        "spec": {"priority": "high", "match": {"recipientDomains": ["*"]}},
    }
    resp = crds.create(bad_route, dry_run=True)
    assert resp.status in (400, 422), resp
    for age, accepted in (("1h30m", True), ("4 hours", False)):
        policy = {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayPolicy",
            "metadata": {"name": "warn", "namespace": "kurrier-crs"},
            "spec": {"delayWarningTime": age},
        }
        resp = crds.create(policy, dry_run=True)
        assert (resp.status == 201) == accepted, resp
    assert "must be a duration" in resp.message, resp.message
    for recipients, accepted in ((["alice", "Bob.Smith+x"], True), (["alice@in.test"], False)):
        domain = {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": "listed", "namespace": "kurrier-crs"},
            "spec": {"domain": "in.test", "acceptInbound": True, "recipients": recipients},
        }
        resp = crds.create(domain, dry_run=True)
        assert (resp.status == 201) == accepted, resp


def check_notes_commands(notes: str) -> None:
    """The commands NOTES.txt tells people to run are ones kurrier and Python accept."""
    # Heredocs start at column 0, so that they work when pasted into a shell.
    snippet = notes.split("python3 - <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    compile(snippet, "NOTES.txt", "exec")
    kurrier_lines = [line for line in notes.splitlines() if " -- kurrier " in line]
    assert kurrier_lines, notes
    for line in kurrier_lines:
        argv = shlex.split(line.split(" -- kurrier ", 1)[1])
        build_parser().parse_args(argv)  # exits (SystemExit) on a bad command line


def subject_can(
    api: Api,
    namespace: str,
    account: str,
    verb: str,
    resource: str,
    group: str = "",
    subresource: str = "",
    in_namespace: str | None = None,
) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{namespace}:{account}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
            "resourceAttributes": {
                "namespace": in_namespace if in_namespace is not None else namespace,
                "verb": verb,
                "group": group,
                "resource": resource,
                "subresource": subresource,
            },
        },
    }
    resp = api.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    assert resp.status == 201, resp
    allowed: bool = resp.body["status"].get("allowed", False)
    return allowed


def secret_data(api: Api, namespace: str, name: str) -> dict[str, str]:
    got = api.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
    assert got.status == 200, got.message
    data: dict[str, str] = got.body["data"]
    return data


def test_helm_install_upgrade_uninstall(
    helm_bin: Path, chart_cluster: TestCluster, crds: Api, tmp_path: Path
) -> None:
    api = crds
    ns = "kurrier-install"
    env = chart_cluster.env()
    api.ensure_namespace(ns, RESTRICTED)
    chart_ca = ("--set", "nats.tls.certificates=chart")
    out = helm(helm_bin, "install", RELEASE, str(CHART), "--namespace", ns, *chart_ca, env=env)
    assert "STATUS: deployed" in out, out
    nats_secrets = {name: secret_data(api, ns, name) for name in NATS_SECRETS}
    # NOTES.txt tells how to send a test mail.
    assert f"kubectl port-forward -n {ns} svc/kurrier-ingress 2525:25" in out, out
    assert f"helm test {RELEASE} -n {ns}" in out, out
    check_notes_commands(out)
    # ...and the example resources it prints are valid for the CRDs.
    example = out.split("<<'YAML'\n", 1)[1].split("\nYAML\n", 1)[0]
    for doc in yaml.safe_load_all(example):
        doc["metadata"]["namespace"] = ns
        resp = api.create(doc, dry_run=True)
        assert resp.status == 201, (doc, resp.message)

    got = api.request("GET", f"/apis/apps/v1/namespaces/{ns}/deployments")
    assert sorted(d["metadata"]["name"] for d in got.body["items"]) == [
        "kurrier-delivery",
        "kurrier-ingress",
        "kurrier-operator",
        "kurrier-queue",
    ]

    # The operator's RBAC, as the API server's authorizer sees it.
    op = "kurrier-operator"
    for verb in ("list", "watch"):
        assert subject_can(api, ns, op, verb, "relayroutes", "kurrier.io")
    assert not subject_can(api, ns, op, "patch", "relayroutes", "kurrier.io")
    assert subject_can(api, ns, op, "patch", "relaydomains", "kurrier.io", "status")
    assert subject_can(api, ns, op, "patch", "relaypolicies", "kurrier.io", "status")
    assert subject_can(api, ns, op, "watch", "secrets", in_namespace="apps")  # cluster-wide
    assert subject_can(api, ns, op, "create", "events")
    assert not subject_can(api, ns, op, "create", "secrets")
    assert not subject_can(api, ns, op, "delete", "relayroutes", "kurrier.io")
    assert not subject_can(api, ns, op, "create", "relayroutes", "kurrier.io")
    assert not subject_can(api, ns, op, "list", "pods")
    for account in ("kurrier-ingress", "kurrier-queue", "kurrier-delivery", "kurrier-nats"):
        for verb, resource, group in (
            ("get", "secrets", ""),
            ("list", "relayroutes", "kurrier.io"),
            ("create", "events", ""),
        ):
            assert not subject_can(api, ns, account, verb, resource, group), (account, verb)

    # This API server serves cert-manager's kinds, so cert-manager makes the gRPC certificates.
    issued = api.request("GET", f"/apis/cert-manager.io/v1/namespaces/{ns}/certificates")
    assert {c["spec"]["secretName"] for c in issued.body["items"]} >= {
        "kurrier-queue-grpc-tls",
        "kurrier-ingress-grpc-tls",
        "kurrier-queue-admin-grpc-tls",
    }

    # Going to a 3-node NATS cluster and back is an in-place upgrade (no
    # immutable field changes), and scoping the operator to namespaces swaps
    # its ClusterRole for Roles.
    values = tmp_path / "upgrade.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "nats": {"replicas": 3, "tls": {"certificates": "chart"}},
                "operator": {"namespaces": [ns]},
                "ingress": {"tokenReview": {"enabled": True}},
            }
        )
    )
    out = helm(
        helm_bin,
        "upgrade",
        RELEASE,
        str(CHART),
        "--namespace",
        ns,
        "--values",
        str(values),
        env=env,
    )
    assert "STATUS: deployed" in out, out
    sts = api.request("GET", f"/apis/apps/v1/namespaces/{ns}/statefulsets/kurrier-nats")
    assert sts.body["spec"]["replicas"] == 3
    # NATS passwords, CA and certificate were made at install and kept (helm lookup).
    assert {name: secret_data(api, ns, name) for name in NATS_SECRETS} == nats_secrets
    assert subject_can(api, ns, op, "list", "relayroutes", "kurrier.io")
    assert not subject_can(api, ns, op, "list", "relayroutes", "kurrier.io", in_namespace="other")
    assert not subject_can(api, ns, op, "get", "secrets", in_namespace="other")
    # ServiceAccount-token SMTP auth: ingress may review tokens, and do nothing else.
    review = ("create", "tokenreviews", "authentication.k8s.io")
    assert subject_can(api, ns, "kurrier-ingress", *review)
    assert not subject_can(api, ns, "kurrier-ingress", "get", "secrets")
    assert not subject_can(api, ns, "kurrier-ingress", "list", "relayroutes", "kurrier.io")

    out = helm(helm_bin, "upgrade", RELEASE, str(CHART), "-n", ns, "--reset-values", env=env)
    assert "STATUS: deployed" in out, out
    assert secret_data(api, ns, "kurrier-nats-auth") == nats_secrets["kurrier-nats-auth"]
    assert not subject_can(api, ns, "kurrier-ingress", *review)
    assert subject_can(api, ns, op, "list", "relayroutes", "kurrier.io", in_namespace="other")

    helm(helm_bin, "uninstall", RELEASE, "--namespace", ns, env=env)
    got = api.request("GET", f"/apis/apps/v1/namespaces/{ns}/deployments")
    assert got.body["items"] == []
    roles = api.request("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles")
    assert not [r for r in roles.body["items"] if r["metadata"]["name"].startswith(ns)]
