"""DKIM keys: reading a Secret's PEM key and the DNS TXT record that publishes it.

Pure functions shared by delivery (which signs) and the operator (which shows
the record to publish in a RelayDomain's status). Only RSA keys are accepted:
dkimpy signs Ed25519 only with PyNaCl and raw keys, and RSA is what every
receiver verifies (RFC 8301 asks for at least 1024 bits; 2048 is usual).
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

MIN_RSA_BITS = 1024


class DkimKeyError(ValueError):
    """The PEM text is not a usable DKIM private key."""


def _load_rsa(private_key_pem: str | bytes) -> rsa.RSAPrivateKey:
    pem = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        # TypeError: the key is encrypted; a Secret must hold it unencrypted.
        raise DkimKeyError(f"not a readable unencrypted PEM private key: {error}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DkimKeyError(f"DKIM key must be RSA, got {type(key).__name__}")
    if key.key_size < MIN_RSA_BITS:
        raise DkimKeyError(f"RSA key has {key.key_size} bits; DKIM needs at least {MIN_RSA_BITS}")
    return key


def signing_key_pem(private_key_pem: str | bytes) -> bytes:
    """The key as PKCS#1 PEM, the only form dkimpy's signer reads (PKCS#8 is converted)."""
    return _load_rsa(private_key_pem).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def dkim_txt_record(private_key_pem: str | bytes, selector: str, domain: str) -> tuple[str, str]:
    """The (name, value) of the TXT record that publishes the key (RFC 6376 3.6.1).

    The value is one logical string; DNS tools split it into 255-octet chunks.
    """
    public_der = (
        _load_rsa(private_key_pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    name = f"{selector}._domainkey.{domain.rstrip('.').lower()}"
    return name, f"v=DKIM1; k=rsa; p={base64.b64encode(public_der).decode()}"
