"""The operator through outages: NATS away, the API server away, an object deleted under it.

None of these may crash the operator or leave its table or statuses behind
for good: it backs off, and once what was away is back, it catches up with
every change made meanwhile. The operator runs as in the other operator
tests (the chart's ServiceAccount and RBAC, a real API server, a real
nats-server); for the API server outage it reaches the API server through a
TCP proxy the test cuts. The status patch that meets a deleted object is
played deterministically, by the operator's own reconciler on a listing
taken before the deletion.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kopf
import pytest
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.operator.apiserver import ApiServer, credentials
from kurrier.operator.cluster_objects import ObservedObject
from kurrier.operator.reconciler import ClusterView, Reconciler

from tests.operator.objects import apply, delete, events_of, path_of, wait_for_status
from tests.operator.operator_process import OperatorProcess
from tests.operator.published_table import route_names, wait_for_table
from tests.support.kube import Api, TestCluster
from tests.support.nats import NatsServer
from tests.support.processes import wait_until
from tests.support.relay import route
from tests.support.tcp_proxy import TcpProxy

# A change made while something is away shows within this once it is back
# (the reconciler's back-off tops out at 30 s; kopf's reconnects are quicker).
CATCH_UP = 90
OUTAGE_SEEN = "failed; escalating"


def _running(operator: OperatorProcess, condition: Callable[[], bool]) -> Callable[[], bool]:
    """condition, failing at once if the operator exited meanwhile."""

    def check() -> bool:
        assert operator.process is not None and operator.process.poll() is None, (
            f"the operator exited; see {operator.log_path}"
        )
        return condition()

    return check


def _retry_delays(log: Path) -> list[float]:
    text = log.read_text(errors="replace")
    return [float(d) for d in re.findall(r"reconcile failed, retrying in ([0-9.]+)s", text)]


def test_a_nats_outage_is_waited_out_with_back_off(
    kube: Api, operator_kubeconfig: Path, namespace: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    with OperatorProcess(tmp_path, operator_kubeconfig, nats_server.url, [namespace]) as operator:
        apply(kube, namespace, route("r", ["example.com"], 2526))
        wait_for_status(kube, "RelayRoute", namespace, "r", ready=True)
        nats_server.stop()
        wait_until(lambda: not operator.healthy(), 30, "/healthz to report NATS away")
        # A change while NATS is away: the pass fails, and is tried again later and later.
        apply(kube, namespace, route("r", ["example.com"], 2600))
        wait_until(
            _running(operator, lambda: len(_retry_delays(operator.log_path)) >= 3),
            60,
            "three failed reconciles",
        )
        delays = _retry_delays(operator.log_path)
        assert delays == sorted(delays) and delays[0] < delays[-1], delays
        nats_server.start()
        body = wait_for_status(
            kube, "RelayRoute", namespace, "r", ready=True, generation=2, timeout=CATCH_UP
        )
        table = wait_for_table(
            nats_server.url,
            lambda t: t["revision"] >= body["status"]["tableRevision"],
            "the change to be published",
        )
        assert table["routes"][0]["smarthost"] == ["127.0.0.1", 2600]
        wait_until(operator.healthy, 30, "/healthz to recover")


def _proxied(kubeconfig: Path, proxy: TcpProxy, path: Path) -> Path:
    config = json.loads(kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


@pytest.mark.slow
def test_an_api_server_outage_is_ridden_out(
    kube: Api,
    kube_cluster: TestCluster,
    operator_kubeconfig: Path,
    namespace: str,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    apiserver_port = int(kube_cluster.server.rsplit(":", 1)[1])
    with TcpProxy(apiserver_port) as proxy:
        kubeconfig = _proxied(operator_kubeconfig, proxy, tmp_path / "proxied-kubeconfig")
        with OperatorProcess(tmp_path, kubeconfig, nats_server.url, [namespace]) as operator:
            apply(kube, namespace, route("before", ["example.com"], 2526))
            wait_for_status(kube, "RelayRoute", namespace, "before", ready=True)
            proxy.stop()  # the API server is unreachable for the operator
            # Changes the operator cannot see yet: a new route, a changed one, a deleted one.
            apply(kube, namespace, route("during", ["example.org"], 2527))
            apply(kube, namespace, route("before", ["example.com"], 2600))
            apply(kube, namespace, route("short-lived", ["example.net"], 2528))
            delete(kube, "RelayRoute", namespace, "short-lived")
            # Past kopf's own retries (9 attempts over about a minute) of each watch.
            wait_until(
                _running(
                    operator, lambda: OUTAGE_SEEN in operator.log_path.read_text(errors="replace")
                ),
                120,
                "the operator's API requests to give up retrying",
            )
            proxy.start()
            during = wait_for_status(
                kube, "RelayRoute", namespace, "during", ready=True, timeout=CATCH_UP
            )
            wait_for_status(
                kube, "RelayRoute", namespace, "before", ready=True, generation=2, timeout=CATCH_UP
            )
            # The watch may replay the outage's events one by one (short-lived
            # added, then deleted), so a table between them may still hold it:
            # what must hold is the table the operator settles on.
            expected = [f"{namespace}/before", f"{namespace}/during"]
            tables: list[dict[str, Any]] = []

            def settled(table: dict[str, Any]) -> bool:
                tables.append(table)
                return (
                    table["revision"] >= during["status"]["tableRevision"]
                    and any(r["smarthost"] == ["127.0.0.1", 2600] for r in table["routes"])
                    and route_names(table) == expected
                )

            try:
                wait_for_table(
                    nats_server.url, settled, "the changes made during the outage", CATCH_UP
                )
            except AssertionError as error:
                last = route_names(tables[-1]) if tables else None
                raise AssertionError(f"{error}; the last table's routes: {last}") from None


async def _reconcile_over_a_deletion(
    kube: Api, namespace: str, nats_url: str
) -> tuple[list[str], list[str]]:
    """One pass on a listing that still holds an object deleted since, then the next."""
    for name, port in (("gone", 2526), ("kept", 2527)):
        apply(kube, namespace, route(name, [f"{name}.example"], port))
    listed = [
        ObservedObject.from_body(kube.request("GET", path_of("RelayRoute", namespace, n)).body)
        for n in ("gone", "kept")  # "gone" first: its 404 comes before kept's patch
    ]
    delete(kube, "RelayRoute", namespace, "gone")
    nc = await connect(nats_url, "test-reconciler")
    api = ApiServer(lambda: credentials(kopf.OperatorSettings()))
    try:
        js = nc.jetstream()
        await ensure_layout(js)
        reconciler = Reconciler(js, api, [namespace])
        reconciler.notice_object(
            ClusterView(objects=lambda: listed, secrets=dict), listed[0].identity, 1
        )
        await reconciler.reconcile()  # patches gone's status: 404
        first = [o.name for o in listed if _ready(kube, namespace, o.name)]
        # The watch's DELETED event brings the next pass, on what exists (changed meanwhile).
        apply(kube, namespace, route("kept", ["kept.example"], 2600))
        remaining = [
            ObservedObject.from_body(
                kube.request("GET", path_of("RelayRoute", namespace, "kept")).body
            )
        ]
        reconciler.notice_object(
            ClusterView(objects=lambda: remaining, secrets=dict), listed[0].identity, 0
        )
        await reconciler.reconcile()
        second = [o.name for o in remaining if _ready(kube, namespace, o.name, generation=2)]
        return first, second
    finally:
        await api.close()
        await disconnect(nc)


def _ready(kube: Api, namespace: str, name: str, generation: int = 1) -> bool:
    found = kube.request("GET", path_of("RelayRoute", namespace, name))
    if found.status == 404:
        return False
    status = found.body.get("status") or {}
    conditions = status.get("conditions") or [{}]
    return status.get("observedGeneration") == generation and conditions[0].get("status") == "True"


def test_a_status_patch_on_an_object_deleted_meanwhile_is_skipped(
    kube: Api,
    operator_kubeconfig: Path,
    namespace: str,
    nats_server: NatsServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As the operator logs in: its ServiceAccount under the chart's RBAC.
    monkeypatch.setenv("KUBECONFIG", str(operator_kubeconfig))
    first, second = asyncio.run(_reconcile_over_a_deletion(kube, namespace, nats_server.url))
    # The 404 did not end the pass: the object after it got its status and Event.
    assert first == ["kept"]
    assert [e["reason"] for e in events_of(kube, namespace, "kept")] == ["Published"] * 2
    # And the next pass goes on as usual.
    assert second == ["kept"]
    assert events_of(kube, namespace, "gone") == []
