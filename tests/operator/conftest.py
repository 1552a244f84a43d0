"""Fixtures for the operator tests: the session's API server with the chart's CRDs and RBAC."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.operator.objects import new_namespace
from tests.operator.operator_process import install_operator_rbac, service_account_kubeconfig
from tests.support.chart import Scenario, chart_crds
from tests.support.kube import Api, TestCluster, testbin_dir


@pytest.fixture(scope="session")
def kube(kube_cluster: TestCluster) -> Api:
    """An admin client of the API server, with the chart's CRDs installed."""
    api = kube_cluster.api()
    for crd in chart_crds():
        api.install_crd(crd)
    return api


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return testbin_dir() / "helm"


@pytest.fixture(scope="session")
def operator_kubeconfig(
    kube_cluster: TestCluster, kube: Api, helm_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Credentials of the chart's operator ServiceAccount, bound by the chart's ClusterRole."""
    workdir = tmp_path_factory.mktemp("operator-rbac")
    install_operator_rbac(kube, helm_bin, workdir, Scenario("operator-rbac"))
    return service_account_kubeconfig(kube_cluster, kube, workdir / "kubeconfig")


@pytest.fixture
def namespace(kube: Api) -> str:
    """A fresh namespace per test: operators under test watch only it."""
    return new_namespace(kube)
