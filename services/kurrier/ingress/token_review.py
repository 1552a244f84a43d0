"""Kubernetes ServiceAccount tokens as SMTP passwords, checked with the TokenReview API.

The one place ingress talks to the API server. It needs `create` on
`tokenreviews` (authentication.k8s.io) and nothing else. A token that passed
is remembered for a short TTL, keyed by its SHA-256 (the token itself is never
kept or logged), so a busy app does not cost an API call per message; a
revoked token therefore works at most TTL longer.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

log = logging.getLogger(__name__)

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
REVIEW_TIMEOUT = 5.0
MAX_CACHED = 10_000


class Review(enum.Enum):
    REJECTED = "rejected"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class KubeApiSettings:
    server: str
    token_file: Path
    ca_file: Path | None

    @classmethod
    def in_cluster(cls) -> KubeApiSettings | None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (IN_CLUSTER_DIR / "token").exists():
            return None
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", IN_CLUSTER_DIR / "token", IN_CLUSTER_DIR / "ca.crt")


def looks_like_token(password: bytes) -> bool:
    """A JWT: what a projected ServiceAccount token is, and no bcrypt-hashed password."""
    # A base64url JSON header ("eyJ" is '{"'), then payload and signature.
    return password.startswith(b"eyJ") and password.count(b".") == 2


class TokenReviewer:
    def __init__(self, api: KubeApiSettings, cache_ttl: float = 30.0) -> None:
        self._api = api
        self._ttl = cache_ttl
        self._cache: dict[bytes, tuple[str, float]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def review(self, token: bytes, audience: str) -> str | Review:
        """The ServiceAccount's identity ('system:serviceaccount:NS:NAME'), or why not."""
        key = hashlib.sha256(audience.encode() + b"\0" + token).digest()
        cached = self._cache.get(key)
        now = time.monotonic()
        if cached and cached[1] > now:
            return cached[0]
        verdict = await self._ask(token, audience)
        if isinstance(verdict, str) and self._ttl > 0:
            if len(self._cache) >= MAX_CACHED:
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) < MAX_CACHED:
                self._cache[key] = (verdict, now + self._ttl)
        return verdict

    async def _ask(self, token: bytes, audience: str) -> str | Review:
        try:
            token_text = token.decode("ascii")
        except UnicodeDecodeError:
            return Review.REJECTED
        try:
            own_token = self._api.token_file.read_text().strip()  # re-read: it is rotated
        except OSError as error:
            log.error("cannot read the API token file %s: %s", self._api.token_file, error)
            return Review.UNAVAILABLE
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token_text, "audiences": [audience]},
        }
        try:
            session = self._client()
            async with session.post(
                self._api.server + REVIEW_PATH,
                json=body,
                headers={"Authorization": f"Bearer {own_token}"},
                timeout=aiohttp.ClientTimeout(total=REVIEW_TIMEOUT),
            ) as response:
                if response.status in (401, 403):
                    log.error(
                        "the API server refused our TokenReview (HTTP %d): ingress needs "
                        "'create' on tokenreviews.authentication.k8s.io",
                        response.status,
                    )
                    return Review.UNAVAILABLE
                if response.status != 201:
                    log.warning("TokenReview failed with HTTP %d", response.status)
                    return Review.UNAVAILABLE
                status = (await response.json()).get("status", {})
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.warning("TokenReview failed: %s", type(error).__name__)
            return Review.UNAVAILABLE
        username = str(status.get("user", {}).get("username", ""))
        audiences = status.get("audiences") or [audience]
        if (
            status.get("authenticated") is True
            and audience in audiences
            and username.startswith("system:serviceaccount:")
        ):
            return username
        return Review.REJECTED

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            context = ssl.create_default_context(
                cafile=str(self._api.ca_file) if self._api.ca_file else None
            )
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
