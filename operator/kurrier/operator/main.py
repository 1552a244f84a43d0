"""`kurrier operator`: relay resources in the API server -> routing table in NATS KV, and status.

kopf runs standalone (no peering objects): several replicas are safe because
each one's work is idempotent — the same objects compile to the same table,
an unchanged table is not republished, and status patches converge.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import kopf
from kurrier.core.dns_resolver import dns_resolver
from kurrier.core.service import Connected, Hooks, Service, serve
from kurrier.operator.apiserver import ApiError, ApiServer, CredentialsError, credentials
from kurrier.operator.cluster_objects import PLURALS
from kurrier.operator.dkim_dns import DKIM_LOOKUP_TIMEOUT, DkimDnsCheck
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
    dkim_dns_check: float | None = None  # seconds between DkimPublished checks; None: off
    dns_resolver: str | None = None
    platform_namespace: str = ""  # empty: no tenancy (core/tenancy.py)


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
        await serve(
            Service(
                "operator",
                settings.nats_url,
                settings.replicas,
                settings.metrics_listen,
                functools.partial(_start, settings, options, api),
                follows_table=False,  # it publishes the table
                own_signals=True,  # kopf stops on SIGTERM/SIGINT by itself
            )
        )
    finally:
        await api.close()


async def _start(
    settings: OperatorSettings, options: kopf.OperatorSettings, api: ApiServer, nats: Connected
) -> Hooks:
    dkim_check = None
    if settings.dkim_dns_check is not None:
        resolver = dns_resolver(settings.dns_resolver, DKIM_LOOKUP_TIMEOUT)
        dkim_check = DkimDnsCheck(resolver, settings.dkim_dns_check)
    reconciler = Reconciler(
        nats.js, api, settings.namespaces, dkim_check, settings.platform_namespace
    )

    async def operate() -> None:
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

    # Healthy once the first table is published (and while NATS is reachable).
    return Hooks(main=operate, healthy=lambda: reconciler.synced)
