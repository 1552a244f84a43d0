"""DNSSEC for real in tests: zones signed with ldns-signzone and a validating unbound.

The public DNS is not reachable here, so the zones are the test's own: one
signed zone (`signed.test`, signed with a key made once per session), unsigned
zones (`unsigned.test`, and children of the signed zone delegated without a DS
record, which are insecure delegations), and records a test may tamper with
after signing (a bogus signature). unbound serves them as authority zones it
fetches from as it would from upstream, so every answer goes through its
validator with the signed zone's key as trust anchor: the AD bit kurrier
trusts is unbound's verdict, and a bogus answer is unbound's SERVFAIL.
scripts/testbin.sh installs unbound and ldnsutils (Debian packages).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.resolver

from tests.support.processes import free_port, stop_process, wait_until

SIGNED_ZONE = "signed.test"
UNSIGNED_ZONE = "unsigned.test"
_NAME_SERVER = f"ns.{SIGNED_ZONE}"


def _absolute(name: str) -> str:
    return name.lower().rstrip(".") + "."


@dataclass(frozen=True)
class ZoneKey:
    """A signing key of the signed zone, as ldns-keygen writes it (the name of its files)."""

    path: Path

    @property
    def trust_anchor(self) -> Path:
        """Its DS record: the validator's trust anchor for the signed zone."""
        return self.path.with_name(f"{self.path.name}.ds")

    @classmethod
    def generate(cls, directory: Path) -> ZoneKey:
        directory.mkdir(parents=True, exist_ok=True)
        made = subprocess.run(
            ["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", SIGNED_ZONE],
            cwd=directory,
            check=True,
            capture_output=True,
            text=True,
        )
        return cls(directory / made.stdout.strip())


@dataclass
class _Zone:
    name: str
    signed: bool
    records: list[str] = field(default_factory=list)

    def holds(self, name: str) -> bool:
        return name == self.name or name.endswith(f".{self.name}")

    def text(self) -> str:
        head = [
            "$TTL 300",
            f"{self.name} IN SOA {_NAME_SERVER}. hostmaster.{SIGNED_ZONE}. 1 3600 600 86400 300",
            f"{self.name} IN NS {_NAME_SERVER}.",
        ]
        return "\n".join(head + self.records) + "\n"


class ValidatingDns:
    """The zones of one test and, once `serving`, unbound validating them on loopback."""

    def __init__(self, directory: Path, key: ZoneKey) -> None:
        self._directory = directory
        self._key = key
        self.port = free_port()
        # Every zone names the same name server, with its address in the signed zone
        # (unbound reads the zones from files and never asks it).
        name_server_address = f"{_NAME_SERVER}. IN A 127.0.0.1"
        self._zones = [
            _Zone(_absolute(SIGNED_ZONE), True, [name_server_address]),
            _Zone(_absolute(UNSIGNED_ZONE), False),
        ]
        self._tampered: dict[tuple[str, str], list[str]] = {}

    @property
    def address(self) -> str:
        """HOST:PORT, as `--dns-resolver` takes it."""
        return f"127.0.0.1:{self.port}"

    def _zone_of(self, name: str) -> _Zone:
        return max((z for z in self._zones if z.holds(name)), key=lambda z: len(z.name))

    def add(self, name: str, rdtype: str, *rdatas: str) -> None:
        name = _absolute(name)
        self._zone_of(name).records.extend(f"{name} IN {rdtype} {rdata}" for rdata in rdatas)

    def delegate_unsigned(self, child: str) -> None:
        """Make child an unsigned zone of its own, delegated with no DS: insecure."""
        child = _absolute(child)
        self._zone_of(child).records.append(f"{child} IN NS {_NAME_SERVER}.")
        self._zones.append(_Zone(child, False))

    def tamper(self, name: str, rdtype: str, *rdatas: str) -> None:
        """Replace a signed record set's data after signing: its signature no longer fits."""
        self._tampered[(_absolute(name), rdtype.upper())] = list(rdatas)

    def _zone_file(self, zone: _Zone) -> Path:
        path = self._directory / f"{zone.name}zone"
        path.write_text(zone.text())
        if not zone.signed:
            return path
        subprocess.run(
            ["ldns-signzone", "-f", f"{path}.signed", str(path), str(self._key.path)],
            check=True,
            capture_output=True,
        )
        signed = Path(f"{path}.signed")
        signed.write_text(self._with_tampering(signed.read_text()))
        return signed

    def _with_tampering(self, zone_text: str) -> str:
        lines: list[str] = []
        replaced: set[tuple[str, str]] = set()
        for line in zone_text.splitlines():
            fields = line.split()
            rrset = (fields[0], fields[3]) if len(fields) > 4 else ("", "")
            if rrset not in self._tampered:
                lines.append(line)
            elif rrset not in replaced:  # the whole record set, once
                replaced.add(rrset)
                lines.extend(f"{rrset[0]} 300 IN {rrset[1]} {r}" for r in self._tampered[rrset])
        return "\n".join(lines) + "\n"

    def _config(self) -> Path:
        zones = "".join(
            f'auth-zone:\n  name: "{zone.name}"\n  zonefile: "{self._zone_file(zone)}"\n'
            # Answers from the zone as if fetched upstream, so the validator checks them.
            "  for-upstream: yes\n  for-downstream: no\n"
            for zone in self._zones
        )
        config = self._directory / "unbound.conf"
        config.write_text(
            "server:\n"
            f"  interface: 127.0.0.1@{self.port}\n"
            "  do-ip6: no\n  do-daemonize: no\n  num-threads: 1\n"
            '  username: ""\n  chroot: ""\n  pidfile: ""\n'
            f'  directory: "{self._directory}"\n'
            '  use-syslog: no\n  logfile: ""\n  verbosity: 1\n'
            "  access-control: 127.0.0.0/8 allow\n"
            '  module-config: "validator iterator"\n'
            f'  trust-anchor-file: "{self._key.trust_anchor}"\n'
            # .test is special-use (RFC 6761): unbound answers NXDOMAIN for it by default.
            '  local-zone: "test." nodefault\n' + zones
        )
        return config

    def _answers(self, unbound: subprocess.Popen[bytes]) -> bool:
        if unbound.poll() is not None:
            log = (self._directory / "unbound.log").read_text(errors="replace")
            raise AssertionError(f"unbound exited {unbound.returncode}:\n{log}")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        # A query sent before unbound listens is lost: ask again soon rather than wait.
        resolver.lifetime = 0.2
        try:
            resolver.resolve(SIGNED_ZONE, "SOA")
        except dns.exception.DNSException:
            return False
        return True

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Sign the zones as they are and run unbound on them until the block ends."""
        self._directory.mkdir(parents=True, exist_ok=True)
        config = self._config()
        with (self._directory / "unbound.log").open("wb") as log:
            unbound = subprocess.Popen(
                ["unbound", "-d", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
            try:
                wait_until(lambda: self._answers(unbound), 10, "unbound to answer")
                yield
            finally:
                stop_process(unbound)
