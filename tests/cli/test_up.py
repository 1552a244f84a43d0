"""`kurrier up`'s embedded nats-server: how it is started."""

from __future__ import annotations

import os
from pathlib import Path

from kurrier.cli.nats_server import nats_server_env

from tests.support.relay import UpRelay, documents, inbound_domain, route, trusting
from tests.support.sink import Sink


def test_nats_server_gets_a_quarter_of_the_cpus_as_go_processors() -> None:
    cpus = len(os.sched_getaffinity(0))
    env = nats_server_env({"PATH": "/usr/bin"})
    assert env == {"PATH": "/usr/bin", "GOMAXPROCS": str(max(1, cpus // 4))}


def test_a_gomaxprocs_the_user_set_is_kept() -> None:
    assert nats_server_env({"GOMAXPROCS": "7"})["GOMAXPROCS"] == "7"


def test_up_starts_nats_server_with_that_environment(tmp_path: Path, sink: Sink) -> None:
    config = documents(
        inbound_domain("example.com"), route("to-sink", ["example.com"], sink.port), trusting()
    )
    with UpRelay(tmp_path, config) as relay:
        environ = Path(f"/proc/{relay.pid('nats-server')}/environ").read_bytes()
    variables = dict(entry.split(b"=", 1) for entry in environ.split(b"\0") if entry)
    assert variables[b"GOMAXPROCS"] == nats_server_env()["GOMAXPROCS"].encode()
    # Everything else is passed on as `kurrier up` got it.
    assert variables[b"PATH"] == os.environ["PATH"].encode()
