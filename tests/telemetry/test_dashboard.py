"""The Grafana dashboard in the chart: off by default, a labelled ConfigMap when on, and every
query names a metric the services really export."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support import kube
from tests.support.chart import CHART, helm

EVERY_INSTRUMENT = """
from kurrier.core import metrics as m, telemetry as t
t.setup_telemetry("kurrier-test")
for counter in (m.MESSAGES_RECEIVED, m.MESSAGES_REJECTED, m.MESSAGES_QUEUED,
                m.RECIPIENTS_DELIVERED, m.RECIPIENTS_DEFERRED, m.RECIPIENTS_BOUNCED,
                m.DELIVERY_ATTEMPTS):
    counter.add(1)
for histogram in (m.TIME_IN_QUEUE, m.DELIVERY_DURATION):
    histogram.record(1.0)
for gauge in (m.SMTP_SESSIONS, m.NATS_CONNECTED, m.TLS_CERTIFICATE_EXPIRY):
    gauge.follow(lambda: 1)
for by_state in (m.QUEUE_DEPTH, m.QUEUE_OLDEST_AGE):
    by_state.update({"active": 1})
print(t.render_metrics().decode())
"""


def exported_metric_names() -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", EVERY_INSTRUMENT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"^(kurrier_[a-z_]+)", done.stdout, re.MULTILINE))


def render(*values: str) -> list[dict[str, Any]]:
    args = [f"--set={v}" for v in values]
    out = helm(kube.testbin_dir() / "helm", "template", "relay", str(CHART), *args)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def dashboard_configmaps(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]


def test_the_dashboard_is_off_by_default() -> None:
    assert dashboard_configmaps(render()) == []


def test_the_dashboard_configmap_carries_the_json_every_query_of_which_exists() -> None:
    [configmap] = dashboard_configmaps(
        render("grafana.dashboard.enabled=true", "grafana.dashboard.namespace=monitoring")
    )
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["app.kubernetes.io/component"] == "dashboard"
    shipped = json.loads(configmap["data"]["kurrier.json"])
    assert shipped == json.loads((Path(CHART) / "dashboards" / "kurrier.json").read_text())

    exported = exported_metric_names()
    panels = [p for p in shipped["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    queried = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bkurrier_[a-z_]+", target["expr"]))
            assert names, target["expr"]
            queried |= names
    unknown = {n for n in queried if n not in exported and f"{n}_bucket" not in exported}
    assert not unknown, f"the dashboard queries metrics nobody exports: {unknown}"
    # Every metric the services export is on the dashboard.
    families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in exported}
    assert families <= {re.sub(r"_bucket$", "", n) for n in queried}, families - queried
