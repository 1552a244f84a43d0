"""The bundled NATS configuration, probes and preStop hook, checked with a real nats-server."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from kurrier.cli.nats_server import nats_server_binary

from tests.chart.rendered_nats import SERVER_ENV, lay_out, render_nats, running


@pytest.mark.parametrize("replicas", [1, 3, 5])
def test_config_is_valid_for_nats_server(helm_bin: Path, replicas: int, tmp_path: Path) -> None:
    nats = render_nats(helm_bin, tmp_path, {"replicas": replicas})
    laid_out = lay_out(nats, tmp_path)
    proc = subprocess.run(
        [nats_server_binary(), "--config", str(laid_out.config), "-t"],
        capture_output=True,
        text=True,
        env={**os.environ, **SERVER_ENV},
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is valid" in proc.stdout + proc.stderr
    # The container runs the same file from the mounted ConfigMap, auth.conf
    # beside it from the Secret, the certificate from its own Secret.
    spec = nats.statefulset["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["args"] == ["--config", "/etc/nats-config/nats.conf"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {
        "config": "/etc/nats-config",
        "tls": "/etc/nats-tls",
        "data": "/data",
        "run": "/var/run/nats",
    }
    [config] = [v for v in spec["volumes"] if v["name"] == "config"]
    sources = config["projected"]["sources"]
    assert sources[0]["configMap"]["name"] == "kurrier-nats"
    assert sources[1]["secret"] == {
        "name": "kurrier-nats-auth",
        "items": [{"key": "auth.conf", "path": "auth.conf"}],
    }
    conf = nats.conf
    assert "store_dir: /data" in conf and "pid_file: /var/run/nats/nats.pid" in conf
    assert ("cluster {" in conf) == (replicas > 1)


@pytest.mark.parametrize(
    ("replicas", "sync", "rendered"),
    [
        (1, None, "always"),  # nothing else holds the write: sync before acknowledging
        (3, None, None),  # a majority of nodes holds it: NATS's own interval
        (1, "2m", "2m"),
        (3, "always", "always"),
    ],
)
def test_a_single_node_syncs_every_write_unless_told_otherwise(
    helm_bin: Path, tmp_path: Path, replicas: int, sync: str | None, rendered: str | None
) -> None:
    values: dict[str, object] = {"replicas": replicas}
    if sync is not None:
        values["jetstream"] = {"syncInterval": sync}
    conf = render_nats(helm_bin, tmp_path, values).conf
    lines = [line.strip() for line in conf.splitlines() if "sync_interval" in line]
    assert lines == ([f"sync_interval: {rendered}"] if rendered else [])


def test_single_node_serves_the_probes_and_lame_duck_prestop(
    helm_bin: Path, tmp_path: Path
) -> None:
    """Run the rendered single-node config for real (ports and paths moved to tmp)."""
    nats = render_nats(helm_bin, tmp_path, {"replicas": 1})
    laid_out = lay_out(nats, tmp_path)
    monitor = laid_out.monitor_port
    with running(laid_out) as server:
        c = nats.statefulset["spec"]["template"]["spec"]["containers"][0]
        probes = [
            c[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
        ]
        assert probes == [
            ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8222/healthz"],
            ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8222/healthz?js-server-only=true"],
            ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8222/healthz?js-enabled-only=true"],
        ]
        # Each command as the kubelet runs it in the pod, on the laid-out port (GNU wget
        # here, busybox's in the image: both fail on any status but 2xx).
        moved = [[*p[:-1], p[-1].replace(":8222", f":{monitor}")] for p in probes]
        deadline = time.monotonic() + 30
        while not all(subprocess.run(p, check=False, timeout=10).returncode == 0 for p in moved):
            assert server.poll() is None, (tmp_path / "nats.log").read_text()
            assert time.monotonic() < deadline, "probes never passed"
            time.sleep(0.1)  # poll back-off, bounded by the deadline
        # A status other than 2xx fails the probe.
        missing = [*moved[0][:-1], f"http://127.0.0.1:{monitor}/no-such-endpoint"]
        assert subprocess.run(missing, check=False, timeout=10).returncode != 0

        # The preStop hook: lame duck mode through the pid file, then exit.
        prestop = c["lifecycle"]["preStop"]["exec"]["command"]
        assert prestop == ["nats-server", "--signal", "ldm=/var/run/nats/nats.pid"]
        command = [nats_server_binary(), *prestop[1:-1], f"ldm={tmp_path / 'nats.pid'}"]
        subprocess.run(command, check=True, capture_output=True, timeout=30)
        assert server.wait(timeout=30) == 0
        assert "lame duck" in (tmp_path / "nats.log").read_text().lower()
