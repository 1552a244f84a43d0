"""DANE for SMTP (RFC 7672): TLSA records, trusted only when DNSSEC-validated, and the
check of a next hop's certificate chain against them.

kurrier validates no DNSSEC itself. As Postfix does, it trusts the AD bit
("authenticated data") of its resolver's answers, and only when told to
(`--dane on`): the resolver named by `--dns-resolver` must validate, and the
path to it must be one nobody can tamper with (a resolver on the same host
or pod). Then, for an MX host whose MX records (or, without MX, the domain's
own address records) and address records are secure, the TLSA records at
`_<port>._tcp.<host>` decide:

- secure, with usable records (usage DANE-TA(2) or DANE-EE(3)): TLS is
  required and the certificate must match one of them; a mismatch, or no
  STARTTLS, defers (the next MX host is tried);
- secure, but none usable (PKIX usages 0 and 1, unknown selectors or
  matching types): TLS is required, unauthenticated (RFC 7672 2.2);
- insecure or absent: no DANE; the route's mode and MTA-STS apply.

A TLSA lookup that fails for a host whose names are secure defers, rather
than falling back to no authentication (RFC 7672 2.2.1). DANE-EE matches
the server's own certificate, with no name or expiry check (RFC 7672
3.1.1); DANE-TA matches a certificate of the chain the server sent, which
must then be signed link by link from the server's certificate up to it,
and the server's certificate must name the MX host (RFC 7672 3.1.2, 3.2).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from kurrier.core.dns_resolver import dns_resolver
from kurrier.delivery.mail_exchangers import UnroutableDomain

DANE_TA = 2
DANE_EE = 3
_SELECTORS = (0, 1)  # the full certificate, its SubjectPublicKeyInfo
_MATCHING = {0: None, 1: "sha256", 2: "sha512"}  # exact, or a digest


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    matching: int
    data: bytes

    @property
    def usable(self) -> bool:
        return (
            self.usage in (DANE_TA, DANE_EE)
            and self.selector in _SELECTORS
            and self.matching in _MATCHING
        )

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.matching} {self.data.hex()}"

    def matches(self, certificate: x509.Certificate) -> bool:
        if self.selector == 0:
            selected = certificate.public_bytes(serialization.Encoding.DER)
        else:
            selected = certificate.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        digest = _MATCHING[self.matching]
        return (hashlib.new(digest, selected).digest() if digest else selected) == self.data


@dataclass(frozen=True)
class TlsaRecords:
    """The secure TLSA records of one MX host; none usable means encrypt, unauthenticated."""

    host: str
    records: tuple[Tlsa, ...]

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return tuple(record for record in self.records if record.usable)


def _names_host(certificate: x509.Certificate, host: str) -> bool:
    """Whether the certificate's DNS names cover host ('*.' standing for one label)."""
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    host = host.lower().rstrip(".")
    for name in (n.lower().rstrip(".") for n in names):
        if name == host:
            return True
        if name.startswith("*.") and host.partition(".")[2] == name[2:] and "." in name[2:]:
            return True
    return False


def _signed_up_to(chain: list[x509.Certificate], anchor: int, now: datetime.datetime) -> bool:
    """Whether chain[0] .. chain[anchor] each is issued and signed by the next, and valid now."""
    for certificate, issuer in itertools.pairwise(chain[: anchor + 1]):
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            return False
        try:
            certificate.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            return False
    return True


def chain_problem(tlsa: TlsaRecords, chain_der: list[bytes]) -> str | None:
    """Why the chain the server sent (its certificate first) matches none of the usable
    records; None when one matches."""
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError as error:
        return f"unreadable certificate: {error}"
    if not chain:
        return "no certificate"
    now = datetime.datetime.now(datetime.UTC)
    for record in tlsa.usable:
        if record.usage == DANE_EE and record.matches(chain[0]):
            return None
        if record.usage == DANE_TA and _names_host(chain[0], tlsa.host):
            for position, certificate in enumerate(chain):
                if record.matches(certificate) and _signed_up_to(chain, position, now):
                    return None
    return f"no TLSA record of {tlsa.host} matches its certificate chain"


class DaneDns:
    """The DNSSEC status of an MX host's names and its TLSA records, by the resolver's AD bit."""

    def __init__(self, resolver_address: str | None, timeout: float) -> None:
        self._resolver: dns.asyncresolver.Resolver = dns_resolver(resolver_address, timeout)
        # Ask for DNSSEC (DO) and say the AD bit is understood (RFC 6840 5.7).
        self._resolver.use_edns(0, dns.flags.DO, 1232)
        self._resolver.flags = dns.flags.RD | dns.flags.AD

    async def _secure(self, name: str, rdtype: str) -> bool:
        """Whether the answer for name (records or their absence) is authenticated."""
        try:
            answer = await self._resolver.resolve(
                name, rdtype, search=False, raise_on_no_answer=False
            )
        except (dns.exception.DNSException, OSError):
            return False
        return bool(answer.response.flags & dns.flags.AD)

    async def tlsa(self, domain: str, host: str, port: int) -> TlsaRecords | None:
        """The host's secure TLSA records, or None when DANE does not apply to it."""
        names_secure = await self._secure(domain, "MX") and await self._secure(host, "A")
        if not names_secure:
            return None
        name = f"_{port}._tcp.{host}"
        try:
            answer = await self._resolver.resolve(name, "TLSA", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        except (dns.exception.DNSException, OSError) as error:
            raise UnroutableDomain(f"451 4.7.5 TLSA lookup of {name} failed: {error}") from None
        if not answer.response.flags & dns.flags.AD:
            return None
        return TlsaRecords(
            host,
            tuple(Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer),
        )
