"""A private CA made at each `kurrier up`, for mutual TLS between its children.

The queue gets a server certificate for `localhost`, ingress and the admin
commands a client certificate each, with the identities the queue authorises
calls by (`core/grpc_tls.py`); the NATS nodes of a cluster one certificate
they present on their routes, both ways. All are EC P-256, signed by a CA
whose key is never written to disk (nothing can issue another certificate
after start, so no other server can join the routes).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kurrier.cli.nats_server import RouteTls
from kurrier.core.grpc_tls import (
    ADMIN_IDENTITY,
    INGRESS_IDENTITY,
    QUEUE_IDENTITY,
    GrpcTls,
    QueueTls,
)
from kurrier.core.private_files import private_directory, write_private

# The name the queue's certificate carries and its clients verify; a unix
# socket or a loopback address has no name of its own.
QUEUE_NAME = "localhost"
LOCAL_VALIDITY = datetime.timedelta(days=365)
NATS_IDENTITY = "kurrier-nats"


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    signer: ec.EllipticCurvePrivateKey,
    names: tuple[str, ...] = (),
    *,
    ca: bool = False,
    client: bool = False,
    peer: bool = False,
    validity: datetime.timedelta = LOCAL_VALIDITY,
) -> x509.Certificate:
    """A certificate for key: a CA's (ca=True), else a server's for names or, with
    client=True, a client's, or with peer=True both (a NATS node dials its routes and
    accepts them). Self-signed when issuer is None."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        usages = [
            *([ExtendedKeyUsageOID.SERVER_AUTH] if peer or not client else []),
            *([ExtendedKeyUsageOID.CLIENT_AUTH] if peer or client else []),
        ]
        builder = builder.add_extension(_san(names or (subject,)), critical=False).add_extension(
            x509.ExtendedKeyUsage(usages), critical=False
        )
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
    return builder.sign(signer, hashes.SHA256())


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_pem(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
) -> bytes:
    """The key as unencrypted PKCS#8 PEM (``BEGIN PRIVATE KEY``)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class LocalTls:
    """The queue's server side and each client's side of mutual TLS in `kurrier up`."""

    queue: GrpcTls
    ingress: QueueTls
    admin: QueueTls
    nats_routes: RouteTls


def make_local_tls(directory: Path) -> LocalTls:
    """A new CA and the queue's, ingress's and the admin commands' certificates, written
    in directory."""
    private_directory(directory)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("kurrier up local CA", ca_key, None, ca_key, ca=True)
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(certificate_pem(ca))

    def issue(
        identity: str, names: tuple[str, ...] = (), client: bool = True, peer: bool = False
    ) -> tuple[str, str]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(identity, key, ca, ca_key, names, client=client, peer=peer)
        cert_file, key_file = directory / f"{identity}.crt", directory / f"{identity}.key"
        cert_file.write_bytes(certificate_pem(cert))
        write_private(key_file, private_pem(key))
        return str(cert_file), str(key_file)

    def client(identity: str) -> QueueTls:
        return QueueTls(str(ca_file), *issue(identity), QUEUE_NAME)

    queue = GrpcTls(*issue(QUEUE_IDENTITY, (QUEUE_NAME, "127.0.0.1"), client=False), str(ca_file))
    routes = RouteTls(*issue(NATS_IDENTITY, (QUEUE_NAME, "127.0.0.1"), peer=True), str(ca_file))
    return LocalTls(queue, client(INGRESS_IDENTITY), client(ADMIN_IDENTITY), routes)
