"""The ingress TLS certificate: loaded from files and reloaded in place when they change.

In a cluster the files are a mounted Secret that cert-manager renews; the
kubelet swaps them under a symlink. One SSLContext object serves every
listener (the implicit-TLS socket holds on to it), so a reload loads the new
pair into that same object, and only after it loaded cleanly into a scratch
context: a half-written renewal (new certificate, old key) never breaks TLS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
from pathlib import Path

from cryptography import x509

log = logging.getLogger(__name__)

RELOAD_INTERVAL = 2.0
# Mozilla's "intermediate" TLS 1.2 suites; TLS 1.3 suites are OpenSSL's own (all AEAD).
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)


def _new_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def _expiry(cert_file: Path | str) -> float:
    """When the chain's first certificate, the server's own, expires (Unix time)."""
    certificate = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    return certificate.not_valid_after_utc.timestamp()


def _fingerprint(*paths: str) -> tuple[tuple[int, int, int], ...]:
    stats = (os.stat(path) for path in paths)  # follows the Secret's symlinks
    return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)


class ServerCertificate:
    def __init__(self, cert_file: str, key_file: str) -> None:
        self._cert_file = cert_file
        self._key_file = key_file
        self.context = _new_context()
        self._seen = _fingerprint(cert_file, key_file)
        self.context.load_cert_chain(cert_file, key_file)
        self.expires_at = _expiry(cert_file)

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed and are a valid pair; True if loaded."""
        try:
            seen = _fingerprint(self._cert_file, self._key_file)
        except OSError as error:
            log.error("TLS certificate files unreadable, keeping the loaded one: %s", error)
            return False
        if seen == self._seen:
            return False
        self._seen = seen  # a bad pair is tried again when the files change again
        # Load exactly the bytes that were checked, whatever lands on disk meanwhile.
        with tempfile.TemporaryDirectory(prefix="kurrier-tls-") as scratch:
            cert, key = Path(scratch, "cert.pem"), Path(scratch, "key.pem")
            try:
                cert.write_bytes(Path(self._cert_file).read_bytes())
                key.touch(mode=0o600)
                key.write_bytes(Path(self._key_file).read_bytes())
                _new_context().load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as error:
                log.error("new TLS certificate not loaded, keeping the old one: %s", error)
                return False
            self.context.load_cert_chain(cert, key)
            self.expires_at = _expiry(cert)
        log.info("TLS certificate reloaded from %s", self._cert_file)
        return True

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            self.reload_if_changed()
