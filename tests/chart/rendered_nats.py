"""The bundled NATS as the chart renders it, laid out on disk and run by a real nats-server.

Only what a pod gives the server differs: ports, and the paths of the store,
the pid file and the mounted certificate move into a temporary directory.
The configuration itself, the users' file (auth.conf) and the certificates
are the rendered ones.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kurrier.cli.nats_server import nats_server_binary

from tests.support.chart import Scenario, find, render
from tests.support.kube import Obj
from tests.support.processes import free_port, port_open, wait_until

NATS_NAME = "kurrier-nats"
SERVER_ENV = {"SERVER_NAME": "kurrier-nats-0"}
CLIENT_PORT, MONITOR_PORT = 4222, 8222  # as rendered


def secret_data(secret: Obj) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in secret["data"].items()}


@dataclass(frozen=True)
class RenderedNats:
    objects: list[Obj]
    conf: str  # nats.conf, from the ConfigMap
    auth: dict[str, bytes]  # the auth Secret: auth.conf and each user's password
    tls: dict[str, bytes]  # the TLS Secret: ca.crt, tls.crt, tls.key

    @property
    def statefulset(self) -> Obj:
        return find(self.objects, "StatefulSet", NATS_NAME)

    def password(self, user: str) -> str:
        return self.auth[user].decode()


def render_nats(helm_bin: Path, workdir: Path, values: Mapping[str, Any]) -> RenderedNats:
    name = "nats-" + str(abs(hash(repr(values))))[:8]
    objects = render(helm_bin, Scenario(name, {"nats": dict(values)}), workdir)
    conf: str = find(objects, "ConfigMap", NATS_NAME)["data"]["nats.conf"]
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    auth = secret_data(secrets[f"{NATS_NAME}-auth"]) if f"{NATS_NAME}-auth" in secrets else {}
    tls = secret_data(secrets[f"{NATS_NAME}-tls"]) if f"{NATS_NAME}-tls" in secrets else {}
    return RenderedNats(objects, conf, auth, tls)


@dataclass(frozen=True)
class LaidOut:
    config: Path
    client_port: int
    monitor_port: int
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "tls" / "ca.crt"


def lay_out(nats: RenderedNats, directory: Path, own_network: bool = False) -> LaidOut:
    """Write the configuration, auth.conf beside it (its include is relative) and the
    certificates, with paths moved into directory, and ports onto free ones of
    127.0.0.1 unless the server runs in a network namespace of its own (own_network),
    where the rendered addresses stand as they are."""
    (directory / "tls").mkdir(parents=True, exist_ok=True)
    for name, content in nats.tls.items():
        (directory / "tls" / name).write_bytes(content)
    if "auth.conf" in nats.auth:
        (directory / "auth.conf").write_bytes(nats.auth["auth.conf"])
    conf = (
        nats.conf.replace("/var/run/nats/nats.pid", str(directory / "nats.pid"))
        .replace("store_dir: /data", f"store_dir: {directory / 'data'}")
        .replace("/etc/nats-tls/", f"{directory / 'tls'}/")
        .replace("lame_duck_grace_period: 10s", "lame_duck_grace_period: 0s")
    )
    client, monitor = CLIENT_PORT, MONITOR_PORT
    if not own_network:
        client, monitor = free_port(), free_port()
        conf = re.sub(r"(?m)^listen: 0\.0\.0\.0:4222$", f"listen: 127.0.0.1:{client}", conf)
        conf = re.sub(r"(?m)^http: [0-9.]+:8222$", f"http: 127.0.0.1:{monitor}", conf)
    config = directory / "nats.conf"
    config.write_text(conf)
    return LaidOut(config, client, monitor, directory)


@contextmanager
def running(laid_out: LaidOut) -> Iterator[subprocess.Popen[bytes]]:
    """nats-server on the laid-out configuration, until the block ends."""
    log_path = laid_out.directory / "nats.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [nats_server_binary(), "--config", str(laid_out.config)],
            env={**os.environ, **SERVER_ENV},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(
                lambda: server.poll() is None and port_open(laid_out.client_port),
                30,
                f"the rendered nats-server to listen (its log: {log_path})",
            )
            yield server
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
