"""Shared fixtures: real nats-server, real SMTP sinks, one real API server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kurrier.cli.nats_server import PORT_RANGE_VARIABLE

from tests.support.kube import TestCluster, start_test_cluster
from tests.support.nats import NatsServer
from tests.support.processes import worker_port_range
from tests.support.sink import Sink


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest worker, and whatever it starts (`kurrier up` picks its children's
    ports), picks ports from a range of its own: a port one worker picked looks
    free to the other until its listener binds."""
    worker, count = (
        os.environ.get("PYTEST_XDIST_WORKER"),
        os.environ.get("PYTEST_XDIST_WORKER_COUNT"),
    )
    if worker and count:
        low, high = worker_port_range(int(worker.removeprefix("gw")), int(count))
        os.environ[PORT_RANGE_VARIABLE] = f"{low}-{high}"


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


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCluster]:
    """One etcd and kube-apiserver for the tests of a pytest worker (three run side
    by side, each with its own) that leave it running.

    Tests keep apart by namespace and by the names of what is cluster-wide (the
    chart prefixes its ClusterRoles with the release's namespace); CRDs are
    installed, idempotently, by whichever test needs them. A test that needs an
    API server in another state (without the CRDs, say) starts its own.
    """
    with start_test_cluster(tmp_path_factory.mktemp("kube")) as cluster:
        yield cluster
