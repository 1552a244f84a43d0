"""DKIM keys: reading a Secret's PEM key and the DNS TXT record that publishes it.

Pure functions shared by delivery (which signs) and the operator (which shows
the record to publish in a RelayDomain's status). RSA keys (RFC 6376; RFC 8301
asks for at least 1024 bits, 2048 is usual) and Ed25519 keys (RFC 8463) are
accepted; RSA is what every receiver verifies, Ed25519 what newer ones prefer,
so a domain usually signs with both.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

MIN_RSA_BITS = 1024


class DkimKeyError(ValueError):
    """The PEM text is not a usable DKIM private key."""


@dataclass(frozen=True)
class SigningKey:
    """A key in the form dkimpy's signer reads, with the algorithm it signs with."""

    algorithm: bytes  # the a= tag: rsa-sha256 or ed25519-sha256
    key: bytes  # RSA: PKCS#1 PEM (dkimpy reads no PKCS#8); Ed25519: the base64 32-octet seed


_PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def _load(private_key_pem: str | bytes) -> _PrivateKey:
    pem = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        # TypeError: the key is encrypted; a Secret must hold it unencrypted.
        raise DkimKeyError(f"not a readable unencrypted PEM private key: {error}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DkimKeyError(f"DKIM key must be RSA or Ed25519, got {type(key).__name__}")
    if key.key_size < MIN_RSA_BITS:
        raise DkimKeyError(f"RSA key has {key.key_size} bits; DKIM needs at least {MIN_RSA_BITS}")
    return key


def signing_key(private_key_pem: str | bytes) -> SigningKey:
    """The key from a Secret's PEM text (PKCS#1 or PKCS#8 RSA, PKCS#8 Ed25519)."""
    key = _load(private_key_pem)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return SigningKey(b"ed25519-sha256", base64.b64encode(seed))
    pkcs1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return SigningKey(b"rsa-sha256", pkcs1)


def dkim_txt_record(private_key_pem: str | bytes, selector: str, domain: str) -> tuple[str, str]:
    """The (name, value) of the TXT record that publishes the key (RFC 6376 3.6.1, RFC 8463 4).

    RSA publishes the DER SubjectPublicKeyInfo, Ed25519 the bare 32-octet
    public key. The value is one logical string; DNS tools split it into
    255-octet chunks.
    """
    key = _load(private_key_pem)
    name = f"{selector}._domainkey.{domain.rstrip('.').lower()}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return name, f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return name, f"v=DKIM1; k=rsa; p={base64.b64encode(public_der).decode()}"
