"""`kurrier operator`: relay resources in the API server -> routing table in NATS KV, and status.

kopf runs standalone (no peering objects): several replicas are safe because
each one's work is idempotent — the same objects compile to the same table,
an unchanged table is not republished, and status patches converge.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import kopf
from kurrier.core.http_endpoint import HttpEndpoint
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.operator.apiserver import ApiError, ApiServer, CredentialsError, credentials
from kurrier.operator.cluster_objects import PLURALS
from kurrier.operator.reconciler import Reconciler
from kurrier.operator.watches import build_registry

log = logging.getLogger(__name__)


class OperatorError(Exception):
    """The operator cannot start; str() says why and what to do."""


@dataclass(frozen=True)
class OperatorSettings:
    """From `kurrier operator`'s flags (kurrier.core.settings.OPERATOR: the defaults are there)."""

    nats_url: str
    replicas: int
    namespaces: tuple[str, ...]  # empty: all namespaces
    kubeconfig: Path | None
    metrics_listen: str | None


def kopf_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # The operator records its own Events (status changes); kopf's would repeat its logs.
    settings.posting.enabled = False
    # The chart grants no CRD/namespace watching: serve what exists at start, quietly.
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    return settings


def _use_kubeconfig(kubeconfig: Path | None) -> None:
    # kopf's login (and so ours) reads KUBECONFIG, as kubectl does.
    if kubeconfig is not None:
        os.environ["KUBECONFIG"] = str(kubeconfig)


async def _require_crds(api: ApiServer) -> None:
    try:
        served = await api.served_plurals()
    except ApiError as error:
        raise OperatorError(f"cannot reach the API server: {error}") from None
    except CredentialsError as error:
        raise OperatorError(str(error)) from None
    missing = sorted(set(PLURALS.values()) - served)
    if missing:
        raise OperatorError(
            f"the API server does not serve {', '.join(missing)}.kurrier.io: install the CRDs "
            "first (kubectl apply -f charts/kurrier/crds/, or helm install the chart)"
        )


async def check_cluster(kubeconfig: Path | None) -> None:
    """Fail early, saying what to do, when the cluster cannot serve the operator."""
    _use_kubeconfig(kubeconfig)
    options = kopf_settings()
    api = ApiServer(lambda: credentials(options))
    try:
        await _require_crds(api)
    finally:
        await api.close()


async def serve_operator(settings: OperatorSettings) -> None:
    _use_kubeconfig(settings.kubeconfig)
    # kopf logs every handled watch event at INFO; the reconciler logs what changed.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    options = kopf_settings()
    api = ApiServer(lambda: credentials(options))
    try:
        await _require_crds(api)
        nc = await connect(settings.nats_url, "kurrier-operator")
    except BaseException:
        await api.close()
        raise
    js = nc.jetstream()
    reconciler = Reconciler(js, api, settings.namespaces)
    try:
        await ensure_layout(js, settings.replicas)
        if settings.metrics_listen:
            # Healthy once the first table is published, and while NATS is reachable.
            await HttpEndpoint(lambda: reconciler.synced and nc.is_connected).serve(
                settings.metrics_listen
            )
        # Created before kopf starts, so kopf does not count it among its own tasks.
        reconciling = asyncio.create_task(reconciler.run(), name="reconciler")
        # kopf stops on SIGTERM/SIGINT by itself; a failed reconciler stops it by
        # cancellation (a stop_flag would leave kopf a waiter to time out on).
        operating = asyncio.create_task(
            kopf.operator(
                registry=build_registry(reconciler),
                settings=options,
                standalone=True,
                clusterwide=not settings.namespaces,
                namespaces=list(settings.namespaces),
            ),
            name="kopf",
        )
        reconciling.add_done_callback(lambda _: operating.cancel())
        await asyncio.gather(operating, return_exceptions=True)
        if reconciling.done() and not reconciling.cancelled():
            reconciling.result()  # the reconciler's failure is the operator's
        reconciling.cancel()
        await asyncio.gather(reconciling, return_exceptions=True)
    finally:
        await api.close()
        await disconnect(nc)
