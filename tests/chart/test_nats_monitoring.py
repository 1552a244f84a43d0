"""What the bundled NATS's monitoring port shows whoever reaches the pod.

The rendered configuration runs with its addresses and ports as rendered, in a
network namespace of its own as in a pod (tests/support/netns.py). The
attacker is this test, outside it, connecting to the pod's address as any
pod could where NetworkPolicy is not enforced; the probes run inside it, as
the kubelet runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
from kurrier.cli.nats_server import nats_server_binary

from tests.chart.rendered_nats import (
    CLIENT_PORT,
    MONITOR_PORT,
    SERVER_ENV,
    lay_out,
    render_nats,
)
from tests.support.netns import TestNetwork
from tests.support.processes import port_open, wait_until


@pytest.mark.parametrize("exposed", [False, True])
def test_the_monitoring_port_is_closed_to_other_pods_unless_exposed(
    helm_bin: Path, tmp_path: Path, exposed: bool
) -> None:
    nats = render_nats(helm_bin, tmp_path, {"monitoring": {"exposed": exposed}})
    laid_out = lay_out(nats, tmp_path, own_network=True)
    container = nats.statefulset["spec"]["template"]["spec"]["containers"][0]
    readiness = container["readinessProbe"]["exec"]["command"]
    with TestNetwork(["pod"]) as network:
        pod = network.hosts["pod"]
        with (tmp_path / "nats.log").open("wb") as log:
            server = subprocess.Popen(
                pod.argv([nats_server_binary(), "--config", str(laid_out.config)]),
                env={**os.environ, **SERVER_ENV},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            # The attacker reaches the pod: its client port answers (and asks for a login).
            wait_until(lambda: port_open(CLIENT_PORT, pod.address), 30, "the client port")
            # Inside the pod the probe passes either way.
            wait_until(
                lambda: subprocess.run(pod.argv(readiness), check=False).returncode == 0,
                30,
                "the readiness probe, inside the pod",
            )
            if not exposed:
                assert not port_open(MONITOR_PORT, pod.address)
                assert "monitor" not in {p["name"] for p in container["ports"]}
                return
            # Exposed, it answers anyone: this is what an attacker reads without a login.
            url = f"http://{pod.address}:{MONITOR_PORT}/varz"
            with urllib.request.urlopen(url, timeout=5) as reply:
                varz = json.load(reply)
            assert varz["server_name"] == SERVER_ENV["SERVER_NAME"]
            assert "monitor" in {p["name"] for p in container["ports"]}
        finally:
            server.kill()
            server.wait()
