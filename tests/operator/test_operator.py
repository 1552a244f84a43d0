"""The operator on a real API server, under the chart's RBAC, publishing into a real NATS.

Every operator here authenticates with a TokenRequest token of the chart's
operator ServiceAccount, bound by the ClusterRole (or Roles) the chart
renders: if it needed more than the chart grants, these tests would fail.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import dkim
import yaml
from kurrier.core.dkim_keys import dkim_txt_record
from kurrier.core.jetstream import CONFIG_BUCKET, ROUTING_TABLE_KEY, connect, disconnect
from kurrier.core.routing import CompiledDkimKey, CompiledDomain
from kurrier.delivery.dkim_signer import DkimSigner

from tests.operator.objects import (
    apply,
    delete,
    events_of,
    new_namespace,
    table_rows,
    wait_for_status,
)
from tests.operator.operator_process import (
    OperatorProcess,
    install_operator_rbac,
    service_account_kubeconfig,
)
from tests.operator.published_table import route_names, routing_table, wait_for_table
from tests.support.certs import ed25519_key, private_pem, rsa_key
from tests.support.chart import Scenario
from tests.support.dns_server import DnsServer, txt
from tests.support.kube import Api, TestCluster, start_test_cluster
from tests.support.nats import NatsServer
from tests.support.processes import kurrier_argv, wait_until
from tests.support.relay import inbound_domain, route, signing_domain, trusting

# A change must reach NATS within this, where a poll or resync would take
# minutes; what it measures is that changes are pushed, not how fast.
CHANGE_DEADLINE = 15.0
AUTHED_ROUTE = """
apiVersion: kurrier.io/v1alpha1
kind: RelayRoute
metadata: {name: authed}
spec:
  match: {recipientDomains: [example.net]}
  destination: {smarthost: {host: smtp.example.net, port: 587}}
  tls: {mode: required}
  auth: {secretRef: {name: relay-creds}}
"""


def _secret(name: str, secret_type: str = "Opaque", **values: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "type": secret_type,
            "stringData": values,
        }
    )


def _signing_domain(secret_name: str) -> str:
    """signed.example, signing with an RSA and an Ed25519 key of secret_name."""
    return yaml.safe_dump(
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": "signed-example"},
            "spec": {
                "domain": "signed.example",
                "dkim": {
                    "keys": [
                        {"selector": "rsa1", "secretRef": {"name": secret_name, "key": "rsa.pem"}},
                        {"selector": "ed1", "secretRef": {"name": secret_name, "key": "ed.pem"}},
                    ]
                },
            },
        }
    )


def _verifies_with_published_records(records: list[dict[str, str]], keys: dict[str, str]) -> bool:
    """Whether mail signed with keys (selector -> PEM) verifies against the status's records.

    dkimpy's dnsfunc answers from the records: the real DNS, where they would be
    published, is out of reach here.
    """
    published = {r["name"]: r["value"].encode() for r in records}
    domain = CompiledDomain(
        domain="signed.example",
        accept_inbound=False,
        dkim_keys=tuple(CompiledDkimKey(selector=s, private_key=k) for s, k in keys.items()),
    )
    signed = DkimSigner().sign(b"From: a@signed.example\r\nSubject: s\r\n\r\nbody\r\n", domain)
    verifier = dkim.DKIM(signed)
    return all(
        verifier.verify(idx=i, dnsfunc=lambda name, timeout=5: published.get(name.decode()[:-1]))
        for i in range(len(keys))
    )


def test_a_route_is_published_changed_listed_and_deleted(
    kube: Api,
    kube_cluster: TestCluster,
    operator_kubeconfig: Path,
    namespace: str,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    with OperatorProcess(tmp_path, operator_kubeconfig, nats_server.url, [namespace]):
        created = apply(kube, namespace, route("to-sink", ["example.com"], 2526))
        assert created.status == 201, created
        body = wait_for_status(kube, "RelayRoute", namespace, "to-sink", ready=True)
        status = body["status"]
        [ready] = status["conditions"]
        assert (ready["reason"], ready["observedGeneration"]) == ("Published", 1)
        assert status["destination"] == "127.0.0.1:2526"
        table = wait_for_table(
            nats_server.url, lambda t: t["revision"] >= status["tableRevision"], "the table"
        )
        assert table["revision"] == status["tableRevision"]
        [compiled] = table["routes"]
        assert (compiled["name"], compiled["smarthost"]) == (
            f"{namespace}/to-sink",
            ["127.0.0.1", 2526],
        )

        columns, rows = table_rows(kube_cluster, "RelayRoute", namespace)
        assert columns[:7] == [
            "Name",
            "Priority",
            "Domains",
            "Destination",
            "TLS",
            "Ready",
            "Reason",
        ]
        assert rows[0][:6] == ["to-sink", 100, '["example.com"]', "127.0.0.1:2526", "none", "True"]

        apply(kube, namespace, route("to-sink", ["example.com"], 2600))
        changed = wait_for_status(
            kube, "RelayRoute", namespace, "to-sink", ready=True, generation=2
        )
        assert changed["status"]["destination"] == "127.0.0.1:2600"
        assert changed["status"]["tableRevision"] > status["tableRevision"]
        table = wait_for_table(
            nats_server.url,
            lambda t: t["revision"] >= changed["status"]["tableRevision"],
            "the changed table",
        )
        assert table["routes"][0]["smarthost"] == ["127.0.0.1", 2600]
        published = sorted(
            e["message"] for e in events_of(kube, namespace, "to-sink") if e["type"] == "Normal"
        )
        assert published == [
            f"generation 1 is in routing table revision {status['tableRevision']}",
            f"generation 2 is in routing table revision {changed['status']['tableRevision']}",
        ]

        delete(kube, "RelayRoute", namespace, "to-sink")
        wait_for_table(nats_server.url, lambda t: route_names(t) == [], "the route to go")


def test_missing_and_malformed_secrets_make_resources_unready(
    kube: Api, operator_kubeconfig: Path, namespace: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    with OperatorProcess(tmp_path, operator_kubeconfig, nats_server.url, [namespace]):
        apply(kube, namespace, AUTHED_ROUTE)
        body = wait_for_status(kube, "RelayRoute", namespace, "authed", ready=False)
        [ready] = body["status"]["conditions"]
        assert (ready["reason"], ready["message"]) == (
            "SecretInvalid",
            "auth Secret 'relay-creds' not found",
        )
        warnings = [e for e in events_of(kube, namespace, "authed") if e["type"] == "Warning"]
        assert [(e["reason"], e["message"]) for e in warnings] == [
            ("SecretInvalid", "auth Secret 'relay-creds' not found")
        ]
        # The route stays in the table, marked: its mail waits rather than taking another route.
        table = wait_for_table(nats_server.url, lambda t: bool(t["routes"]), "the route")
        assert table["routes"][0]["problem"] == "auth Secret 'relay-creds' not found"

        apply(kube, namespace, _secret("relay-creds", "kubernetes.io/basic-auth", username="u"))
        body = wait_for_status(kube, "RelayRoute", namespace, "authed", ready=False)
        wait_until(
            lambda: (
                "lacks 'username' or 'password'"
                in (
                    wait_for_status(kube, "RelayRoute", namespace, "authed", ready=False)["status"][
                        "conditions"
                    ][0]["message"]
                )
            ),
            20,
            "the status to name the malformed Secret",
        )

        apply(
            kube,
            namespace,
            _secret("relay-creds", "kubernetes.io/basic-auth", username="u", password="p"),
        )
        wait_for_status(kube, "RelayRoute", namespace, "authed", ready=True)
        table = wait_for_table(
            nats_server.url, lambda t: t["routes"][0]["problem"] is None, "the credentials"
        )
        assert (table["routes"][0]["username"], table["routes"][0]["password"]) == ("u", "p")


def test_a_signing_domain_shows_the_dns_record_of_each_key(
    kube: Api,
    kube_cluster: TestCluster,
    operator_kubeconfig: Path,
    namespace: str,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    with OperatorProcess(tmp_path, operator_kubeconfig, nats_server.url, [namespace]):
        keys = {"rsa1": private_pem(rsa_key()).decode(), "ed1": private_pem(ed25519_key()).decode()}
        apply(
            kube, namespace, _secret("dkim-key", **{"rsa.pem": "not a key", "ed.pem": keys["ed1"]})
        )
        apply(kube, namespace, _signing_domain("dkim-key"))
        body = wait_for_status(kube, "RelayDomain", namespace, "signed-example", ready=False)
        assert body["status"]["conditions"][0]["reason"] == "SecretInvalid"
        assert "dkim-key" in body["status"]["conditions"][0]["message"]
        # The usable key's record is shown already; the broken one's is not.
        [record] = body["status"]["dkimRecords"]
        assert (record["selector"], record["name"]) == ("ed1", "ed1._domainkey.signed.example")
        apply(
            kube, namespace, _secret("dkim-key", **{"rsa.pem": keys["rsa1"], "ed.pem": keys["ed1"]})
        )
        body = wait_for_status(kube, "RelayDomain", namespace, "signed-example", ready=True)
        records = body["status"]["dkimRecords"]
        assert [r["selector"] for r in records] == ["rsa1", "ed1"]
        assert _verifies_with_published_records(records, keys)
        # A record of another key does not verify: the status shows these keys' records.
        other = {"rsa1": private_pem(rsa_key()).decode(), "ed1": keys["ed1"]}
        assert not _verifies_with_published_records(records, other)
        # The API server's table shows the first match of a column's JSONPath.
        columns, rows = table_rows(kube_cluster, "RelayDomain", namespace)
        assert rows[0][columns.index("DKIM")] == "rsa1"
        wait_for_table(
            nats_server.url,
            lambda t: any(
                [k["selector"] for k in d["dkim_keys"]] == ["rsa1", "ed1"] for d in t["domains"]
            ),
            "the DKIM keys in the table",
        )


def test_dkim_records_are_checked_against_what_dns_publishes(
    kube: Api, operator_kubeconfig: Path, namespace: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    # A local authoritative server stands in for the public DNS, which is out of
    # reach here; TTL 1 s and a check every second, so each change is seen soon.
    key, other = private_pem(ed25519_key()).decode(), private_pem(ed25519_key()).decode()
    name, value = dkim_txt_record(key, "k1", "signed.example")
    with (
        DnsServer() as dns,
        OperatorProcess(
            tmp_path,
            operator_kubeconfig,
            nats_server.url,
            [namespace],
            "--dkim-dns-check",
            "1s",
            "--dns-resolver",
            dns.address,
        ),
    ):
        # First another key's record, then this key's, then none.
        dns.add(name, "TXT", txt(dkim_txt_record(other, "k1", "signed.example")[1]), ttl=1)
        apply(kube, namespace, _secret("dkim-key", **{"private.pem": key}))
        apply(kube, namespace, signing_domain("signed.example", "k1", "dkim-key"))
        body = wait_for_status(
            kube, "RelayDomain", namespace, "signed-example", ready=False, condition="DkimPublished"
        )
        ready, published = body["status"]["conditions"]
        assert ready["status"] == "True"  # mail is signed whatever DNS says
        assert (published["reason"], published["message"]) == (
            "RecordMismatch",
            f"DNS publishes another key at {name}",
        )
        revision = body["status"]["tableRevision"]
        # Other spacing, same key: the record matches.
        dns.add(name, "TXT", txt(value.replace("; ", ";  ")), ttl=1)
        body = wait_for_status(
            kube, "RelayDomain", namespace, "signed-example", ready=True, condition="DkimPublished"
        )
        assert body["status"]["conditions"][1]["reason"] == "RecordsPublished"
        assert body["status"]["tableRevision"] == revision  # DNS changed, not the table
        dns.remove(name, "TXT")
        body = wait_for_status(
            kube,
            "RelayDomain",
            namespace,
            "signed-example",
            ready=False,
            condition="DkimPublished",
            reason="RecordMissing",
        )
        notes = [(e["type"], e["reason"]) for e in events_of(kube, namespace, "signed-example")]
        assert ("Warning", "RecordMismatch") in notes and ("Normal", "RecordsPublished") in notes


def test_cross_resource_gaps_are_reported_and_heal(
    kube: Api, operator_kubeconfig: Path, namespace: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    with OperatorProcess(tmp_path, operator_kubeconfig, nats_server.url, [namespace]):
        apply(kube, namespace, inbound_domain("lonely.test"))
        body = wait_for_status(kube, "RelayDomain", namespace, "lonely-test", ready=False)
        assert body["status"]["conditions"][0]["reason"] == "NoRoute"
        apply(kube, namespace, route("everything", ["*"], 2526))
        wait_for_status(kube, "RelayDomain", namespace, "lonely-test", ready=True)
        apply(kube, namespace, trusting("10.0.0.0/8"))
        wait_for_status(kube, "RelayPolicy", namespace, "default", ready=True)
        table = wait_for_table(
            nats_server.url,
            lambda t: t["policy"]["trusted_networks"] == ["10.0.0.0/8"],
            "the policy",
        )
        assert [d["domain"] for d in table["domains"]] == ["lonely.test"]


async def _change_to_table(
    kube: Api, namespace: str, nats_url: str, port: int, published: int
) -> tuple[float, list[int]]:
    """Apply a change; the seconds until a KV watcher saw its table, and the revisions
    after published (the table's revision before the change) the watcher saw until then.

    nats-py's watcher may hand over the key's current entry after its end-of-history
    marker (None), so revisions up to published are not the change's."""
    nc = await connect(nats_url, "test-watcher")
    applied = 0.0
    revisions: list[int] = []
    try:
        kv = await nc.jetstream().key_value(CONFIG_BUCKET)
        async with asyncio.timeout(CHANGE_DEADLINE):
            async for entry in await kv.watch(ROUTING_TABLE_KEY):
                if entry is None:  # history delivered: now change the route
                    await asyncio.to_thread(apply, kube, namespace, route("fast", ["x.test"], port))
                    applied = time.monotonic()
                elif applied:
                    table = json.loads(entry.value)
                    if table["revision"] <= published:
                        continue
                    revisions.append(table["revision"])
                    if table["routes"][0]["smarthost"][1] == port:
                        return time.monotonic() - applied, revisions
    finally:
        await disconnect(nc)
    raise AssertionError("the watcher ended")


def test_each_change_reaches_nats_by_itself_as_one_revision(
    kube: Api, operator_kubeconfig: Path, namespace: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    # Event-driven, not polled: each change is published on its own, as the next
    # revision, well before any periodic resync would have come. The bound is
    # generous on purpose (a loaded 2-core CI machine); it measures nothing finer.
    with OperatorProcess(tmp_path, operator_kubeconfig, nats_server.url, [namespace]):
        apply(kube, namespace, route("fast", ["x.test"], 3000))
        body = wait_for_status(kube, "RelayRoute", namespace, "fast", ready=True)
        revision = body["status"]["tableRevision"]
        for port in (3001, 3002, 3003):
            seconds, revisions = asyncio.run(
                _change_to_table(kube, namespace, nats_server.url, port, revision)
            )
            revision += 1
            assert revisions == [revision], revisions
            assert seconds < CHANGE_DEADLINE, seconds


def test_two_replicas_agree_and_do_not_churn_revisions(
    kube: Api, operator_kubeconfig: Path, namespace: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    first = OperatorProcess(tmp_path, operator_kubeconfig, nats_server.url, [namespace])
    second = OperatorProcess(tmp_path, operator_kubeconfig, nats_server.url, [namespace])
    with first, second:
        apply(kube, namespace, route("one", ["example.com"], 2526))
        body = wait_for_status(kube, "RelayRoute", namespace, "one", ready=True)
        revision = body["status"]["tableRevision"]
        apply(kube, namespace, route("two", ["example.org"], 2527))
        two = wait_for_status(kube, "RelayRoute", namespace, "two", ready=True)
        # Both replicas compiled the same change; only one revision came of it.
        assert two["status"]["tableRevision"] == revision + 1
        second.__exit__(None, None, None)
        apply(kube, namespace, route("three", ["example.net"], 2528))
        three = wait_for_status(kube, "RelayRoute", namespace, "three", ready=True)
        assert three["status"]["tableRevision"] == revision + 2
        table = routing_table(nats_server.url)
        assert table is not None and table["revision"] == revision + 2
        assert route_names(table) == [f"{namespace}/{n}" for n in ("one", "three", "two")]
        second.__enter__()  # and the survivor's peer rejoins without a new revision
        assert routing_table(nats_server.url) == table


def test_watching_all_namespaces(
    kube: Api, operator_kubeconfig: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    first, second = new_namespace(kube), new_namespace(kube)
    with OperatorProcess(tmp_path, operator_kubeconfig, nats_server.url, []):
        apply(kube, first, route("here", ["example.com"], 2526))
        apply(kube, second, route("there", ["example.org"], 2527))
        wait_for_status(kube, "RelayRoute", first, "here", ready=True)
        wait_for_status(kube, "RelayRoute", second, "there", ready=True)
        table = routing_table(nats_server.url)
        assert table is not None
        assert {f"{first}/here", f"{second}/there"} <= set(route_names(table))
        delete(kube, "RelayRoute", second, "there")
        wait_for_table(
            nats_server.url, lambda t: f"{second}/there" not in route_names(t), "the deletion"
        )


def test_namespaced_rbac_is_enough_for_namespaced_watching(
    kube: Api, kube_cluster: TestCluster, helm_bin: Path, nats_server: NatsServer, tmp_path: Path
) -> None:
    watched = new_namespace(kube)
    scenario = Scenario("operator-roles", {"operator": {"namespaces": [watched]}})
    install_operator_rbac(kube, helm_bin, tmp_path, scenario)
    kubeconfig = service_account_kubeconfig(kube_cluster, kube, tmp_path / "kubeconfig")
    with OperatorProcess(tmp_path, kubeconfig, nats_server.url, [watched]):
        apply(kube, watched, route("scoped", ["example.com"], 2526))
        wait_for_status(kube, "RelayRoute", watched, "scoped", ready=True)


def _operator_error(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        kurrier_argv("operator", "--metrics-listen", "off", *args),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_credentials_and_missing_crds_are_one_clear_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("clusters: [this is not a kubeconfig\n")
    result = _operator_error("--kubeconfig", str(garbage))
    assert result.returncode == 1
    assert "garbage.yaml: not a usable kubeconfig" in result.stderr
    assert "Traceback" not in result.stderr

    with start_test_cluster(tmp_path / "bare") as bare:
        result = _operator_error("--kubeconfig", str(bare.kubeconfig))
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        "kurrier operator: the API server does not serve relaydomains, relaypolicies, "
        "relayroutes.kurrier.io: install the CRDs first (kubectl apply -f charts/kurrier/crds/, "
        "or helm install the chart)"
    ), result.stderr
