"""Keys and certificates made in the test: a private CA issuing host certificates; self-signed ones.

Everything is made in-process with ``cryptography`` (EC P-256 for certificates,
built as `kurrier up` builds its own, RSA where a caller needs it) and written
as PEM files beside the test.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from kurrier.cli.local_ca import certificate
from kurrier.cli.local_ca import private_pem as private_pem
from kurrier.core.grpc_tls import ADMIN_IDENTITY, INGRESS_IDENTITY


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    """A fresh RSA key (DKIM signing keys, the API server's ServiceAccount key)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ed25519_key() -> ed25519.Ed25519PrivateKey:
    """A fresh Ed25519 key (DKIM signing keys, RFC 8463)."""
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """The key's public half as SubjectPublicKeyInfo PEM (``BEGIN PUBLIC KEY``)."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# Test certificates outlive no test by much.
TEST_VALIDITY = datetime.timedelta(days=2)


def _write_pair(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(private_pem(key))
    return cert_file, key_file


def _server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


class TestCA:
    """A CA of the test's own; its certificate is the bundle given to `--tls-ca-file`."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = certificate(
            "kurrier test CA", self._key, None, self._key, ca=True, validity=TEST_VALIDITY
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self, *names: str, directory: Path | None = None, client: bool = False, peer: bool = False
    ) -> tuple[Path, Path]:
        """A certificate this CA signed for names (a server's, with client=True a client's,
        with peer=True one for both ends, as NATS routes use).

        Written as ``names[0].crt`` and ``names[0].key`` in directory (the CA's by
        default); (certificate file, key file).
        """
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(
            names[0],
            key,
            self._cert,
            self._key,
            names,
            client=client,
            peer=peer,
            validity=TEST_VALIDITY,
        )
        return _write_pair(directory or self.directory, names[0], cert, key)

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server-side TLS context whose certificate this CA issued for names."""
        return _server_context(*self.issue(*names))


def self_signed_context(directory: Path, *names: str) -> ssl.SSLContext:
    """A server-side TLS context with a certificate for names that no CA vouches for."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate(names[0], key, None, key, names, validity=TEST_VALIDITY)
    return _server_context(*_write_pair(directory, f"self-signed-{names[0]}", cert, key))


class Certificates(TestCA):
    """A test CA and the certificate files for TLS between the relay's parts.

    ``server_cert``/``server_key`` name relay.test, queue.test and 127.0.0.1;
    ``client_cert``/``client_key`` are ingress's and ``admin_cert``/``admin_key``
    the admin commands', for mutual TLS, with the identities the queue knows.
    ``ca_file`` verifies all; :meth:`issue` makes more (a renewed certificate, say).
    """

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.server_cert, self.server_key = self.issue("relay.test", "queue.test", "127.0.0.1")
        self.client_cert, self.client_key = self.issue(INGRESS_IDENTITY, client=True)
        self.admin_cert, self.admin_key = self.issue(ADMIN_IDENTITY, client=True)
