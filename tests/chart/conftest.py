"""Fixtures for the chart, image and Tiltfile tests: a real helm, a real API server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.chart import chart_crds, yaml_documents
from tests.support.kube import Api, TestCluster, testbin_dir

# Stand-ins for third-party CRDs the chart can render objects of (cert-manager,
# Prometheus Operator): typed where the chart relies on a field, open elsewhere.
THIRD_PARTY_CRDS = Path(__file__).resolve().parent / "crds"


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """The helm binary from scripts/testbin.sh (built once, cached outside the repo)."""
    return testbin_dir() / "helm"


@pytest.fixture(scope="session")
def chart_cluster(kube_cluster: TestCluster) -> TestCluster:
    """The session's kube-apiserver (tests/conftest.py); chart tests install into their own
    namespaces, and the chart names its ClusterRoles after the release's namespace."""
    return kube_cluster


@pytest.fixture(scope="session")
def api(chart_cluster: TestCluster) -> Api:
    return chart_cluster.api()


@pytest.fixture(scope="session")
def crds(api: Api) -> Api:
    """The API server with the chart's CRDs and the third-party stand-ins installed."""
    for crd in [*chart_crds(), *yaml_documents(THIRD_PARTY_CRDS, "*.yaml")]:
        api.install_crd(crd)
    return api
