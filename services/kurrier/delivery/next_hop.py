"""The hosts one attempt tries, in order, and the TLS mode each must be spoken with."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from kurrier.core.addresses import format_host_port
from kurrier.delivery.dane import TlsaRecords
from kurrier.delivery.mail_exchangers import MailHost, UnroutableDomain
from kurrier.delivery.mta_sts import StsPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NextHop:
    address: str  # where to connect: an IP for MX hosts, the configured name for a smarthost
    port: int
    server_name: str  # what the certificate must name (and the SNI sent)
    tls_mode: str
    # For MX hosts: the recipient domain, and its MTA-STS policy as applied (TLS reports).
    policy_domain: str = ""
    policy: StsPolicy | None = None
    # The host's secure TLSA records, when DANE applies (delivery/dane.py).
    tlsa: TlsaRecords | None = None

    @property
    def label(self) -> str:
        if self.address == self.server_name:
            return format_host_port(self.address, self.port)
        return f"{self.server_name}[{self.address}]:{self.port}"


def smarthost_hop(host: str, port: int, tls_mode: str) -> NextHop:
    return NextHop(host, port, host, tls_mode)


def mx_hops(
    domain: str,
    hosts: list[MailHost],
    tls_mode: str,
    policy: StsPolicy | None,
    port: int,
    tlsa: Mapping[str, TlsaRecords] | None = None,
) -> list[NextHop]:
    """Every address of every host, in the order given, under DANE or the domain's MTA-STS
    policy.

    A host with secure TLSA records is spoken to under DANE (RFC 8461 2:
    DANE before MTA-STS): in 'dane' mode when a record is usable, else with
    TLS required (or verified, if the route's mode asks for that). Otherwise,
    in MTA-STS 'enforce' mode only the hosts the policy names are tried, and
    only with a verified certificate, whatever the route says; in 'testing'
    mode the route's TLS mode stands and mismatches are only logged.
    """
    enforce = policy is not None and policy.mode == "enforce"
    hops: list[NextHop] = []
    for host in hosts:
        dane = (tlsa or {}).get(host.name)
        if dane is not None:
            mode = "dane" if dane.usable else "verify" if tls_mode == "verify" else "required"
        elif policy is not None and policy.mode != "none" and not policy.allows(host.name):
            if enforce:
                continue
            log.warning("MTA-STS (testing) of %s does not list MX host %s", domain, host.name)
            mode = tls_mode
        else:
            mode = "verify" if enforce else tls_mode
        hops.extend(
            NextHop(address, port, host.name, mode, domain, policy, dane)
            for address in host.addresses
        )
    if not hops:
        raise UnroutableDomain(f"451 4.7.5 no MX host of {domain} matches its MTA-STS policy")
    return hops
