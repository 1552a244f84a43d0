"""Shared fixtures: real nats-server, real SMTP sinks, kurrier processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nats import NatsServer
from tests.support.sink import Sink


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-store", tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as running:
        yield running
