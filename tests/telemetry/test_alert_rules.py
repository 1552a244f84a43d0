"""The alert rules: valid for Prometheus's own promtool, each one unit-tested, and shipped by
the chart as a PrometheusRule exactly when the cluster can take one or the values ask.

Whether every rule's expression finds series on a live relay is
tests/telemetry/test_prometheus.py's job.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import kube
from tests.support.chart import CHART, Scenario, by_kind, render

RULES = CHART / "alerts" / "kurrier.rules.yaml"
UNIT_TESTS = Path(__file__).parent / "alerts" / "kurrier.rules.test.yaml"
PROMETHEUS_RULE_CRD = "monitoring.coreos.com/v1/PrometheusRule"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool missing: scripts/testbin.sh installs Debian's prometheus package"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


def alert_names(rules: dict[str, Any]) -> set[str]:
    return {rule["alert"] for group in rules["groups"] for rule in group["rules"]}


def test_promtool_checks_the_rules() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_names(yaml.safe_load(RULES.read_text())))} rules found" in (
        checked.stdout
    )


def test_promtool_unit_tests_pass_and_every_alert_is_seen_firing() -> None:
    tested = promtool("test", "rules", str(UNIT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    fired = {
        case["alertname"]
        for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == alert_names(yaml.safe_load(RULES.read_text()))


def _prometheus_rules(tmp_path: Path, values: dict[str, Any], *extra: str) -> list[Any]:
    scenario = Scenario("alerts", {"metrics": {"prometheusRule": values}})
    objects = render(kube.testbin_dir() / "helm", scenario, tmp_path, extra=extra)
    return by_kind(objects, "PrometheusRule")


@pytest.mark.parametrize(
    ("enabled", "crd_served", "rendered"),
    [
        (None, False, False),
        (None, True, True),
        (False, True, False),
        (True, False, True),
    ],
)
def test_the_chart_ships_the_rules_when_the_crd_is_served_or_asked_for(
    tmp_path: Path, enabled: bool | None, crd_served: bool, rendered: bool
) -> None:
    extra = ("--api-versions", PROMETHEUS_RULE_CRD) if crd_served else ()
    found = _prometheus_rules(tmp_path, {"enabled": enabled, "labels": {"release": "kps"}}, *extra)
    assert len(found) == int(rendered)
    if rendered:
        [rule] = found
        assert rule["metadata"]["labels"]["release"] == "kps"
        assert rule["spec"] == yaml.safe_load(RULES.read_text())
