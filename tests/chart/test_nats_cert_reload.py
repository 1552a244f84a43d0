"""A renewed NATS certificate takes effect without a restart: the chart's reloader sidecar.

The rendered nats-server runs with its rendered certificate, mounted the way
the kubelet mounts a Secret (each file a link through `..data`, which a
renewal swaps to a new directory in one rename); the sidecar's own script,
as rendered, runs beside it with the nats-server binary on its PATH. A
renewal (a certificate of another CA) must be what a new TLS client of the
client port is shown, while the server keeps its pid.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from kurrier.cli.nats_server import nats_server_binary

from tests.chart.rendered_nats import NATS_NAME, lay_out, render_nats, running
from tests.support.certs import TestCA
from tests.support.chart import env_of
from tests.support.kube import Obj
from tests.support.processes import wait_until

TLS_FILES = ("ca.crt", "tls.crt", "tls.key")


def _pod(values: Mapping[str, Any], helm_bin: Path, workdir: Path) -> tuple[Any, Obj]:
    rendered = render_nats(helm_bin, workdir, values)
    return rendered, rendered.statefulset["spec"]["template"]["spec"]


def _reloader(pod: Obj) -> Obj | None:
    found = [c for c in pod["containers"] if c["name"] == "tls-reloader"]
    return found[0] if found else None


def _mount_like_the_kubelet(tls: Path, version: str, files: Mapping[str, bytes]) -> None:
    """tls/<file> -> ..data/<file> -> ..<version>/<file>; a new version replaces ..data
    in one rename, so a reader sees the old three files or the new three."""
    (tls / f"..{version}").mkdir()
    for name, content in files.items():
        (tls / f"..{version}" / name).write_bytes(content)
    (tls / "..data_tmp").symlink_to(f"..{version}")
    os.replace(tls / "..data_tmp", tls / "..data")
    for name in files:
        if not (tls / name).is_symlink():
            (tls / name).unlink(missing_ok=True)
            (tls / name).symlink_to(f"..data/{name}")


def _presented(port: int) -> bytes:
    """The certificate nats-server shows a new client (TLS begins after its INFO line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        assert raw.makefile("rb").readline().startswith(b"INFO ")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def _renewal(directory: Path) -> dict[str, bytes]:
    """A certificate for the NATS Service from a CA of its own, as a Secret's three files."""
    cert, key = TestCA(directory).issue(NATS_NAME)
    ca = directory / "ca.pem"
    return {"ca.crt": ca.read_bytes(), "tls.crt": cert.read_bytes(), "tls.key": key.read_bytes()}


def test_renewed_certificates_are_served_without_a_restart(helm_bin: Path, tmp_path: Path) -> None:
    rendered, pod = _pod({"tls": {"reload": {"intervalSeconds": 1}}}, helm_bin, tmp_path)
    assert pod["shareProcessNamespace"] is True
    reloader = _reloader(pod)
    assert reloader is not None
    laid_out = lay_out(rendered, tmp_path / "pod")
    tls = laid_out.directory / "tls"
    _mount_like_the_kubelet(tls, "v1", rendered.tls)
    script = reloader["command"][2].replace("/etc/nats-tls/", f"{tls}/")
    script = script.replace("/var/run/nats/nats.pid", str(laid_out.directory / "nats.pid"))
    path = f"{Path(nats_server_binary()).parent}:{os.environ['PATH']}"

    def shown(files: Mapping[str, bytes], what: str) -> None:
        wanted = _der(files["tls.crt"])
        wait_until(lambda: _presented(laid_out.client_port) == wanted, 30, what)

    with running(laid_out) as server:
        assert _presented(laid_out.client_port) == _der(rendered.tls["tls.crt"])
        # Renewed after NATS started but before the sidecar's first look.
        early = _renewal(tmp_path / "early")
        _mount_like_the_kubelet(tls, "v2", early)
        sidecar = subprocess.Popen(
            ["sh", "-c", script],
            env={**os.environ, **env_of(reloader), "PATH": path},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            shown(early, "nats-server to show the certificate renewed before the sidecar ran")
            later = _renewal(tmp_path / "later")
            _mount_like_the_kubelet(tls, "v3", later)
            shown(later, "nats-server to show the certificate renewed while the sidecar ran")
            assert server.poll() is None, "reloaded, not restarted"
        finally:
            sidecar.kill()
            output = sidecar.communicate()[0].decode()
    assert output.count("nats-server told to load the certificate") == 2, output
    log = (laid_out.directory / "nats.log").read_text()
    assert len(re.findall(r"Reloaded: tls", log)) == 2, log[-2000:]


@pytest.mark.parametrize(
    "values",
    [{"tls": {"reload": {"intervalSeconds": 0}}}, {"tls": {"enabled": False}}],
    ids=["reload off", "no TLS"],
)
def test_without_reloading_there_is_no_sidecar_and_no_shared_processes(
    helm_bin: Path, tmp_path: Path, values: Mapping[str, Any]
) -> None:
    _, pod = _pod(values, helm_bin, tmp_path)
    assert _reloader(pod) is None
    assert "shareProcessNamespace" not in pod
