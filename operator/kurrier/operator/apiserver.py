"""The few API server calls the operator makes itself; kopf does the watching.

Credentials come from the same function kopf logs in with (`credentials`),
so both follow a rotated ServiceAccount token the same way: on a 401, log in
again and retry once.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf
import yaml
from kurrier.core.resources import API_GROUP
from kurrier.operator.cluster_objects import PLURALS, ObservedObject
from kurrier.operator.crds import VERSION
from kurrier.operator.status import EventNote

log = logging.getLogger(__name__)

COMPONENT = "kurrier-operator"
REQUEST_TIMEOUT = 15.0
_GROUP_PATH = f"/apis/{API_GROUP}/{VERSION}"


class ApiError(Exception):
    """The API server refused or failed a request; str() says which and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class CredentialsError(Exception):
    """No usable Kubernetes credentials; str() tells the user what to provide."""


def credentials(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """Like kubectl: $KUBECONFIG (the --kubeconfig flag sets it), in-cluster, ~/.kube/config."""
    source = os.environ.get("KUBECONFIG") or "~/.kube/config"
    try:
        if os.environ.get("KUBECONFIG"):
            info = kopf.login_with_kubeconfig(settings=settings)
        else:
            info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
                settings=settings
            )
    except OSError as error:
        raise CredentialsError(f"{source}: cannot read: {error.strerror}") from None
    except (yaml.YAMLError, KeyError, TypeError, AttributeError, kopf.LoginError) as error:
        raise CredentialsError(f"{source}: not a usable kubeconfig: {error!r}") from None
    if info is None or not info.server:
        raise CredentialsError(
            "no Kubernetes credentials: pass --kubeconfig FILE, set KUBECONFIG, or run in a pod "
            "with a ServiceAccount token"
        )
    return info


class ApiServer:
    def __init__(self, login: Callable[[], kopf.ConnectionInfo]) -> None:
        self._login = login
        self._session: aiohttp.ClientSession | None = None
        self._server = ""

    def _open(self) -> aiohttp.ClientSession:
        info = self._login()
        # A server URL may carry a path (behind a proxy), so paths are appended, not joined.
        self._server = info.server.rstrip("/")
        return aiohttp.ClientSession(
            headers={**info.as_http_headers(), "Accept": "application/json"},
            connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> Any:
        """The decoded JSON answer; ApiError for any status but 2xx."""
        for attempt in (1, 2):
            if self._session is None:
                self._session = self._open()
            try:
                async with self._session.request(
                    method,
                    self._server + path,
                    json=body,
                    params=params,
                    headers={"Content-Type": content_type} if body is not None else None,
                ) as response:
                    if response.status == 401 and attempt == 1:
                        await self.close()  # a rotated token: log in again
                        continue
                    text = await response.text()
                    try:
                        payload = json.loads(text) if text else None
                    except ValueError:  # e.g. a plain "404 page not found"
                        payload = {"message": text.strip()}
                    if response.status >= 300:
                        message = payload.get("message") if isinstance(payload, dict) else None
                        raise ApiError(
                            response.status, f"{method} {path}: {response.status} {message or ''}"
                        )
                    return payload
            except (aiohttp.ClientError, TimeoutError) as error:
                raise ApiError(0, f"{method} {path}: {error!r}") from None
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def served_plurals(self) -> set[str]:
        """The kurrier.io resources the API server serves (empty when the CRDs are missing)."""
        try:
            listing = await self.request("GET", _GROUP_PATH)
        except ApiError as error:
            if error.status == 404:
                return set()
            raise
        return {r["name"] for r in listing.get("resources", []) if "/" not in r["name"]}

    async def nothing_declared(self, namespaces: Sequence[str]) -> bool:
        """True when no RelayDomain, RelayRoute or RelayPolicy exists where we watch."""
        scopes = [f"/namespaces/{ns}" for ns in namespaces] or [""]
        for plural in PLURALS.values():
            for scope in scopes:
                listing = await self.request(
                    "GET", f"{_GROUP_PATH}{scope}/{plural}", params={"limit": "1"}
                )
                if listing.get("items"):
                    return False
        return True

    async def patch_status(self, observed: ObservedObject, status: dict[str, Any]) -> None:
        path = f"{_GROUP_PATH}/namespaces/{observed.namespace}/{observed.plural}/{observed.name}"
        await self.request(
            "PATCH",
            f"{path}/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )

    async def record_event(self, observed: ObservedObject, note: EventNote) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{observed.name}.{secrets.token_hex(8)}",
                "namespace": observed.namespace,
            },
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{VERSION}",
                "kind": observed.kind,
                "name": observed.name,
                "namespace": observed.namespace,
                "uid": observed.uid,
            },
            "type": note.type,
            "reason": note.reason,
            "message": note.message,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": socket.gethostname(),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.request("POST", f"/api/v1/namespaces/{observed.namespace}/events", event)
