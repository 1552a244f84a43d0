"""The bundled NATS configuration, probes and preStop hook, checked with a real nats-server."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kurrier.cli.nats_server import nats_server_binary

from tests.support.chart import Scenario, find, render
from tests.support.kube import Obj
from tests.support.processes import free_port


def nats_objects(
    helm_bin: Path, replicas: int, tmp_path: Path, sync: str | None = None
) -> tuple[str, Obj]:
    values: dict[str, object] = {"replicas": replicas}
    if sync is not None:
        values["jetstream"] = {"syncInterval": sync}
    objects = render(helm_bin, Scenario(f"nats{replicas}", {"nats": values}), tmp_path)
    conf: str = find(objects, "ConfigMap", "kurrier-nats")["data"]["nats.conf"]
    return conf, find(objects, "StatefulSet", "kurrier-nats")


@pytest.mark.parametrize("replicas", [1, 3, 5])
def test_config_is_valid_for_nats_server(helm_bin: Path, replicas: int, tmp_path: Path) -> None:
    conf, sts = nats_objects(helm_bin, replicas, tmp_path)
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    proc = subprocess.run(
        [nats_server_binary(), "--config", str(path), "-t"],
        capture_output=True,
        text=True,
        env={**os.environ, "SERVER_NAME": "kurrier-nats-0"},
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is valid" in proc.stdout + proc.stderr
    # The container runs the same file from the mounted ConfigMap.
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["--config", "/etc/nats-config/nats.conf"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"config": "/etc/nats-config", "data": "/data", "run": "/var/run/nats"}
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
    conf, _ = nats_objects(helm_bin, replicas, tmp_path, sync)
    lines = [line.strip() for line in conf.splitlines() if "sync_interval" in line]
    assert lines == ([f"sync_interval: {rendered}"] if rendered else [])


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def test_single_node_serves_the_probes_and_lame_duck_prestop(
    helm_bin: Path, tmp_path: Path
) -> None:
    """Run the rendered single-node config for real (ports and paths moved to tmp)."""
    conf, sts = nats_objects(helm_bin, 1, tmp_path)
    client, monitor = free_port(), free_port()
    conf = (
        conf.replace("/var/run/nats/nats.pid", str(tmp_path / "nats.pid"))
        .replace("store_dir: /data", f"store_dir: {tmp_path / 'data'}")
        .replace("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{client}")
        .replace("http: 0.0.0.0:8222", f"http: 127.0.0.1:{monitor}")
        .replace("lame_duck_grace_period: 10s", "lame_duck_grace_period: 0s")
    )
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    log = (tmp_path / "nats.log").open("wb")
    server = subprocess.Popen(
        [nats_server_binary(), "--config", str(path)],
        env={**os.environ, "SERVER_NAME": "kurrier-nats-0"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        c = sts["spec"]["template"]["spec"]["containers"][0]
        paths = [
            c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
        ]
        assert paths == [
            "/healthz",
            "/healthz?js-server-only=true",
            "/healthz?js-enabled-only=true",
        ]
        deadline = time.monotonic() + 30
        while not all(http_status(f"http://127.0.0.1:{monitor}{p}") == 200 for p in paths):
            assert server.poll() is None, (tmp_path / "nats.log").read_text()
            assert time.monotonic() < deadline, "probes never answered 200"
            time.sleep(0.1)  # poll back-off, bounded by the deadline

        # The preStop hook: lame duck mode through the pid file, then exit.
        prestop = c["lifecycle"]["preStop"]["exec"]["command"]
        assert prestop == ["nats-server", "--signal", "ldm=/var/run/nats/nats.pid"]
        command = [nats_server_binary(), *prestop[1:-1], f"ldm={tmp_path / 'nats.pid'}"]
        subprocess.run(command, check=True, capture_output=True, timeout=30)
        assert server.wait(timeout=30) == 0
        assert "lame duck" in (tmp_path / "nats.log").read_text().lower()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
