"""MTA-STS (RFC 8461): a domain's published promise that its MX hosts speak verified TLS.

The policy id comes from the `_mta-sts.<domain>` TXT record, the policy from
`https://mta-sts.<domain>/.well-known/mta-sts.txt`, checked against the same
CA bundle as `verify` routes. Policies are cached for their max_age and
fetched again when the TXT id changes; in the background, each cached
policy is fetched again once half its max_age has passed (RFC 8461 5.1 and
10.2: a sender that refreshes before expiry is not left without a policy
by an attacker blocking the fetch just then), so a domain mail goes to
keeps its policy for as long as the domain publishes one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from kurrier.delivery.mail_exchangers import MailDns, UnroutableDomain

log = logging.getLogger(__name__)

StsMode = Literal["enforce", "testing", "none"]
HTTPS_PORT = 443
MAX_POLICY_BYTES = 64 * 1024  # RFC 8461 3.3
MAX_AGE_LIMIT = 31557600
FETCH_TIMEOUT = 30.0
# After a failed fetch, the same policy id is not asked for again this soon.
FETCH_RETRY_AFTER = 300.0
# How often the cached policies are looked at for a refresh.
REFRESH_CHECK_INTERVAL = 3600.0
_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
_MX_PATTERN_RE = re.compile(
    r"^(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$"
)


class StsFetchError(Exception):
    """The policy could not be fetched or read."""


@dataclass(frozen=True)
class StsPolicy:
    id: str
    mode: StsMode
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float

    @property
    def expires(self) -> float:
        return self.fetched_at + self.max_age

    @property
    def refresh_at(self) -> float:
        """When to fetch it again ahead of expiry: half its max_age on."""
        return self.fetched_at + self.max_age / 2

    def allows(self, host: str) -> bool:
        """RFC 8461 4.1: exact names, or '*.' standing for exactly one leftmost label."""
        host = host.rstrip(".").lower()
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, dot, rest = host.partition(".")
                if dot and label and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def policy_id(txt_records: list[str]) -> str | None:
    """The id from the `_mta-sts` TXT records; None unless exactly one valid STSv1 record."""
    candidates = [r for r in txt_records if r.startswith("v=STSv1")]
    if len(candidates) != 1:
        return None
    fields = {}
    for part in candidates[0].split(";"):
        key, _, value = part.strip().partition("=")
        fields[key] = value
    found = fields.get("id", "")
    return found if _ID_RE.match(found) else None


def parse_policy(text: str, policy_id: str, fetched_at: float) -> StsPolicy:
    """The policy file's fields (RFC 8461 3.2); ValueError says what is wrong."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key, value = key.strip(), value.strip()
        if key == "mx":
            if not _MX_PATTERN_RE.match(value.lower()):
                raise ValueError(f"bad mx pattern {value!r}")
            mx.append(value.lower())
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise ValueError("version is not STSv1")
    mode: StsMode
    match fields.get("mode"):
        case "enforce" | "testing" | "none" as known:
            mode = known
        case other:
            raise ValueError(f"bad mode {other!r}")
    max_age = fields.get("max_age", "")
    if not max_age.isdigit() or int(max_age) > MAX_AGE_LIMIT:
        raise ValueError(f"bad max_age {max_age!r}")
    if mode != "none" and not mx:
        raise ValueError("no mx patterns")
    return StsPolicy(policy_id, mode, tuple(mx), int(max_age), fetched_at)


def _policy_body(response: bytes) -> str:
    head, separator, body = response.partition(b"\r\n\r\n")
    if not separator:
        raise StsFetchError("incomplete HTTP response")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    # RFC 8461 3.3: only a 200 counts; redirects are not followed.
    if len(parts) < 2 or parts[1] != "200":
        raise StsFetchError(f"HTTP status {status_line!r}")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("content-type", "").split(";")[0].strip().lower() != "text/plain":
        raise StsFetchError(f"content type {headers.get('content-type')!r} is not text/plain")
    length = headers.get("content-length", "")
    if length.isdigit():
        body = body[: int(length)]
    if len(body) > MAX_POLICY_BYTES:
        raise StsFetchError("policy larger than 64 KiB")
    return body.decode("utf-8")


async def _get(address: str, host: str, context: ssl.SSLContext) -> str:
    # HTTP/1.0 keeps the reply simple (no chunked encoding) for one small file.
    reader, writer = await asyncio.open_connection(
        address, HTTPS_PORT, ssl=context, server_hostname=host
    )
    try:
        writer.write(
            f"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: {host}\r\n"
            "User-Agent: kurrier\r\nConnection: close\r\n\r\n".encode()
        )
        response = b""
        while chunk := await reader.read(65536):
            response += chunk
            if len(response) > MAX_POLICY_BYTES + 16384:
                raise StsFetchError("policy larger than 64 KiB")
    finally:
        writer.close()
    return _policy_body(response)


class StsPolicies:
    """Policies per domain, fetched on demand and cached (one fetch at a time per domain)."""

    def __init__(
        self,
        dns: MailDns,
        tls_context: ssl.SSLContext,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dns = dns
        self._tls = tls_context
        self._clock = clock
        self._cache: dict[str, StsPolicy] = {}
        self._failed: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def cached(self, domain: str) -> StsPolicy | None:
        """The domain's policy as cached, if it has not expired."""
        policy = self._cache.get(domain)
        if policy is not None and policy.expires <= self._clock():
            del self._cache[domain]
            return None
        return policy

    async def policy_for(self, domain: str) -> StsPolicy | None:
        """The domain's policy now; None when it has none (or none could be had yet)."""
        try:
            records = await self._dns.txt(f"_mta-sts.{domain}")
        except UnroutableDomain:
            return self.cached(domain)
        current_id = policy_id(records)
        # RFC 8461 5.1: without a TXT record a cached policy stays in force until it expires.
        if current_id is None:
            return self.cached(domain)
        cached = self.cached(domain)
        if cached is not None and cached.id == current_id:
            return cached
        return await self._update(domain, current_id, ahead=False)

    async def refresh(self) -> None:
        """Fetch again each cached policy whose TXT id changed or whose refresh time came.

        A domain without a TXT record now keeps its cached policy until it
        expires (RFC 8461 5.1), as on demand.
        """
        for domain in list(self._cache):
            try:
                current_id = policy_id(await self._dns.txt(f"_mta-sts.{domain}"))
            except UnroutableDomain:
                continue
            if current_id is not None and self.cached(domain) is not None:
                await self._update(domain, current_id, ahead=True)

    async def keep_fresh(self, interval: float = REFRESH_CHECK_INTERVAL) -> None:
        """Refresh the cached policies every interval, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:  # a refresh gone wrong must not take delivery down with it
                log.exception("MTA-STS policies not refreshed")

    async def _update(self, domain: str, current_id: str, ahead: bool) -> StsPolicy | None:
        """The policy after fetching it, if it still needs fetching once this task holds the
        domain's lock (another may have fetched it meanwhile): for another id, or, ahead,
        past its refresh time. A failed fetch leaves the cached policy in force."""
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:
            cached = self.cached(domain)
            if (
                cached is not None
                and cached.id == current_id
                and not (ahead and cached.refresh_at <= self._clock())
            ):
                return cached
            failed_id, until = self._failed.get(domain, ("", 0.0))
            if failed_id == current_id and self._clock() < until:
                return cached
            try:
                policy = await self._fetch(domain, current_id)
            except (StsFetchError, UnroutableDomain, ValueError) as error:
                log.warning("MTA-STS policy of %s not fetched: %s", domain, error)
                self._failed[domain] = (current_id, self._clock() + FETCH_RETRY_AFTER)
                return cached
            self._failed.pop(domain, None)
            self._cache[domain] = policy
            return policy

    async def _fetch(self, domain: str, current_id: str) -> StsPolicy:
        host = f"mta-sts.{domain}"
        addresses = await self._dns.addresses(host)
        if not addresses:
            raise StsFetchError(f"{host} has no address")
        errors = []
        for address in addresses:
            try:
                async with asyncio.timeout(FETCH_TIMEOUT):
                    text = await _get(address, host, self._tls)
            except (OSError, ssl.SSLError, TimeoutError, StsFetchError, UnicodeError) as error:
                errors.append(f"{address}: {error or type(error).__name__}")
                continue
            return parse_policy(text, current_id, self._clock())
        raise StsFetchError("; ".join(errors))
