"""A certificate, its key and a CA bundle on disk that a renewal replaces: read again
only when they changed, and taken only as a pair that loads.

In a cluster the files are a mounted Secret that cert-manager renews; the
kubelet swaps them under a symlink, so a renewal shows as new inodes. A
half-written renewal (new certificate, old key) is refused and the loaded
one kept; it is tried again when the files change again.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class CertificatePair:
    """The bytes of a certificate chain and its key, with the CA bundle if there is one."""

    cert: bytes
    key: bytes
    ca: bytes | None = None

    @contextmanager
    def as_files(self) -> Iterator[tuple[Path, Path]]:
        """The chain and key in files only this process reads, for APIs that take paths."""
        with tempfile.TemporaryDirectory(prefix="kurrier-tls-") as scratch:
            cert, key = Path(scratch, "cert.pem"), Path(scratch, "key.pem")
            cert.write_bytes(self.cert)
            key.touch(mode=0o600)
            key.write_bytes(self.key)
            yield cert, key

    def check(self) -> None:
        """Raise ssl.SSLError unless the key fits the certificate and the CA bundle loads."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with self.as_files() as (cert, key):
            context.load_cert_chain(cert, key)
        if self.ca is not None:
            context.load_verify_locations(cadata=self.ca.decode("ascii"))


class CertificateFiles:
    def __init__(self, cert_file: str, key_file: str, ca_file: str | None = None) -> None:
        self.cert_file = cert_file
        self._paths = [cert_file, key_file, *([ca_file] if ca_file else [])]
        self._seen: Fingerprint = ()

    def _fingerprint(self) -> Fingerprint:
        stats = (os.stat(path) for path in self._paths)  # follows the Secret's symlinks
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)

    def _read(self) -> CertificatePair:
        cert, key, *ca = (Path(path).read_bytes() for path in self._paths)
        return CertificatePair(cert, key, ca[0] if ca else None)

    def load(self) -> CertificatePair:
        """The files as they are now; raises if they are unreadable or not a pair."""
        self._seen = self._fingerprint()
        pair = self._read()
        pair.check()
        return pair

    def renewed(self) -> CertificatePair | None:
        """The files again if they changed since last read and are a valid pair, else None."""
        try:
            seen = self._fingerprint()
        except OSError as error:
            log.error("TLS certificate files unreadable, keeping the loaded ones: %s", error)
            return None
        if seen == self._seen:
            return None
        self._seen = seen  # a bad pair is tried again when the files change again
        try:
            # Exactly the bytes checked are used, whatever lands on disk meanwhile.
            pair = self._read()
            pair.check()
        except (OSError, ssl.SSLError, UnicodeDecodeError) as error:
            log.error("new TLS certificate not loaded, keeping the old one: %s", error)
            return None
        log.info("TLS certificate reloaded from %s", self.cert_file)
        return pair
