"""The chart against the services' settings (kurrier.core.settings): what it renders and allows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kurrier.core.settings import QUEUE_ADMIN, SERVICES, existing_file

from tests.support.chart import CHART, SCENARIOS, Scenario, env_of, pod_specs, render
from tests.support.kube import Obj

SCHEMA = json.loads((CHART / "values.schema.json").read_text())

# What a service does with its telemetry variables at start, before anything
# else; os._exit skips flushing the exporters to a collector that is not there.
STARTS_TELEMETRY = (
    "import os, sys\n"
    "from kurrier.core.telemetry import setup_telemetry\n"
    "setup_telemetry(sys.argv[1])\n"
    "os._exit(0)\n"
)


def _containers(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for label, spec in pod_specs(objects):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            yield f"{label} ({container['name']})", container


def _command(container: Obj) -> str:
    """The kurrier command a container runs (the image's entrypoint is `kurrier`)."""
    return str((container.get("args") or [""])[0])


def _enum(*keys: str) -> list[str]:
    node = SCHEMA
    for key in keys:
        node = node["properties"][key]
    return list(node["enum"])


@pytest.mark.parametrize("s", SCENARIOS, ids=lambda s: s.name)
def test_every_kurrier_variable_rendered_is_a_setting_of_the_service(
    helm_bin: Path, s: Scenario, tmp_path: Path
) -> None:
    objects = render(helm_bin, s, tmp_path)
    services_seen = set()
    for where, container in _containers(objects):
        command = _command(container)
        settings = SERVICES.get(command, ())
        if command == "queue":
            # `kubectl exec ... -- kurrier queue list` runs in the queue's container too.
            settings = (*settings, *QUEUE_ADMIN)
        declared = {setting.variable: setting for setting in settings}
        services_seen.add(command)
        for name, value in env_of(container).items():
            if not name.startswith("KURRIER_"):
                continue
            assert name in declared, f"{where}: {name} is not a setting of `kurrier {command}`"
            parse = declared[name].parse
            # Files are mounted in the pod, not here.
            if parse is not existing_file:
                parse(value)  # raises, naming the value, if the service would refuse it
    assert services_seen >= {"ingress", "queue", "delivery"}


def test_the_variables_values_yaml_documents_are_settings() -> None:
    documented = set(re.findall(r"`(KURRIER_[A-Z_]+)`", (CHART / "values.yaml").read_text()))
    declared = {setting.variable for settings in SERVICES.values() for setting in settings}
    assert documented, "values.yaml names no KURRIER_* variable any more"
    assert documented <= declared


@pytest.mark.parametrize("protocol", _enum("telemetry", "otlp", "protocol"))
def test_every_otlp_protocol_the_schema_allows_is_one_the_services_start_with(
    helm_bin: Path, protocol: str, tmp_path: Path
) -> None:
    values = {"telemetry": {"otlp": {"endpoint": "http://127.0.0.1:1", "protocol": protocol}}}
    objects = render(helm_bin, Scenario("otlp", values), tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "KURRIER_"))}
    started = set()
    for where, container in _containers(objects):
        command = _command(container)
        if command not in SERVICES:
            continue
        done = subprocess.run(
            [sys.executable, "-c", STARTS_TELEMETRY, f"kurrier-{command}"],
            env={**base, **env_of(container)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, f"{where} would not start:\n{done.stderr}"
        started.add(command)
    assert started == set(SERVICES)
