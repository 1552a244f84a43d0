"""The ingress TLS certificate: loaded from files and reloaded in place when they change.

One SSLContext object serves every listener (the implicit-TLS socket holds
on to it), so a reload loads the renewed pair (`core/certificate_files.py`:
only a pair that loads) into that same object.
"""

from __future__ import annotations

import asyncio
import ssl

from cryptography import x509
from kurrier.core.certificate_files import CertificateFiles, CertificatePair

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


def _expiry(cert: bytes) -> float:
    """When the chain's first certificate, the server's own, expires (Unix time)."""
    return x509.load_pem_x509_certificate(cert).not_valid_after_utc.timestamp()


class ServerCertificate:
    def __init__(self, cert_file: str, key_file: str) -> None:
        self._files = CertificateFiles(cert_file, key_file)
        self.context = _new_context()
        self._load(self._files.load())

    def _load(self, pair: CertificatePair) -> None:
        with pair.as_files() as (cert, key):
            self.context.load_cert_chain(cert, key)
        self.expires_at = _expiry(pair.cert)

    def reload_if_changed(self) -> bool:
        """Load the files again if they changed and are a valid pair; True if loaded."""
        pair = self._files.renewed()
        if pair is None:
            return False
        self._load(pair)
        return True

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            self.reload_if_changed()
