"""Where mail for a domain goes: MX lookup (RFC 5321 5.1), null MX (RFC 7505), addresses.

Answers come from dnspython's async resolver with its cache on, so a busy
domain costs one lookup per record TTL, not one per message.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.resolver
from kurrier.core.dns_resolver import dns_resolver

# Postfix's smtp_mx_address_limit spirit: past this, more addresses only delay the deferral.
MAX_ADDRESSES = 10
DNS_TIMEOUT = 10.0


class UnroutableDomain(Exception):
    """No mail host can be tried now; reply says why, its code whether for good."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return self.reply.startswith("5")


@dataclass(frozen=True)
class MailHost:
    name: str  # the MX host name: what a 'verify' certificate must carry
    preference: int
    addresses: tuple[str, ...]


class _NoSuchName(Exception):
    pass


class MailDns:
    """The DNS questions delivery asks, against one configurable resolver."""

    def __init__(self, resolver_address: str | None = None, timeout: float = DNS_TIMEOUT) -> None:
        self._resolver = dns_resolver(resolver_address, timeout)

    async def _answer(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer; None when the name exists without such records.

        Raises _NoSuchName for NXDOMAIN and UnroutableDomain (temporary) when
        the question could not be answered at all.
        """
        try:
            return await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise _NoSuchName(name) from None
        except dns.resolver.NoAnswer:
            return None
        except (dns.exception.DNSException, OSError) as error:
            raise UnroutableDomain(
                f"451 4.4.3 DNS lookup of {name} {rdtype} failed: {error}"
            ) from None

    async def txt(self, name: str) -> list[str]:
        """The TXT strings at name (each record's strings joined); [] if there are none."""
        try:
            answer = await self._answer(name, "TXT")
        except _NoSuchName:
            return []
        if answer is None:
            return []
        return [b"".join(record.strings).decode("utf-8", "replace") for record in answer]

    async def addresses(self, name: str) -> tuple[str, ...]:
        """IPv4 addresses first, then IPv6 (many clusters have no IPv6 route out).

        () when the name has none or does not exist; UnroutableDomain when
        neither family could be looked up.
        """
        found: list[str] = []
        trouble: UnroutableDomain | None = None
        for result in await asyncio.gather(
            self._answer(name, "A"), self._answer(name, "AAAA"), return_exceptions=True
        ):
            if isinstance(result, UnroutableDomain):
                trouble = result
            elif isinstance(result, _NoSuchName) or result is None:
                continue
            elif isinstance(result, BaseException):
                raise result
            else:
                found.extend(record.address for record in result)
        if not found and trouble is not None:
            raise trouble
        return tuple(found)

    async def mail_hosts(self, domain: str) -> list[MailHost]:
        """The hosts to try for domain, in order, each with its addresses.

        Raises UnroutableDomain: permanent for a domain that does not exist,
        a null MX or hosts that have no address; temporary for DNS trouble.
        """
        try:
            answer = await self._answer(domain, "MX")
        except _NoSuchName:
            raise UnroutableDomain(f"550 5.1.2 domain {domain} does not exist") from None
        if answer is None:
            # No MX: the domain itself is the one mail host (the implicit MX).
            records = [(0, domain)]
        else:
            exchanges = [(record.preference, record.exchange) for record in answer]
            if len(exchanges) == 1 and exchanges[0][1] == dns.name.root:
                raise UnroutableDomain(f"556 5.1.10 {domain} accepts no mail (null MX)")
            # A '.' beside real MX records is a misconfiguration; the real ones still count.
            records = [
                (preference, exchange.to_text(omit_final_dot=True).lower())
                for preference, exchange in exchanges
                if exchange != dns.name.root
            ]
        # RFC 5321 5.1: equal preferences are tried in random order to spread load.
        random.shuffle(records)
        records.sort(key=lambda record: record[0])
        return await self._with_addresses(domain, records)

    async def _with_addresses(self, domain: str, records: list[tuple[int, str]]) -> list[MailHost]:
        results = await asyncio.gather(
            *(self.addresses(name) for _, name in records), return_exceptions=True
        )
        hosts: list[MailHost] = []
        trouble: UnroutableDomain | None = None
        budget = MAX_ADDRESSES
        for (preference, name), result in zip(records, results, strict=True):
            if isinstance(result, UnroutableDomain):
                trouble = result
            elif isinstance(result, BaseException):
                raise result
            elif result and budget > 0:
                hosts.append(MailHost(name, preference, result[:budget]))
                budget -= len(result[:budget])
        if hosts:
            return hosts
        if trouble is not None:
            raise trouble
        raise UnroutableDomain(f"550 5.4.4 no mail host of {domain} has an address")
