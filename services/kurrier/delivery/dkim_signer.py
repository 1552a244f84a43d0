"""DKIM signing (RFC 6376, RFC 8463) of outgoing mail with the sender domain's keys, via dkimpy.

Delivery signs each attempt's copy of the stored, unsigned message, so every
copy that leaves carries exactly one signature per key however often it is
retried, and a message retried after a key rotation is signed with the keys
in DNS now.
"""

from __future__ import annotations

import logging
import re

import dkim
from kurrier.core.dkim_keys import DkimKeyError, SigningKey, signing_key
from kurrier.core.routing import CompiledDkimKey, CompiledDomain
from kurrier.core.smtp_text import header_section

log = logging.getLogger(__name__)

# What a reader sees and what a replay must not alter (RFC 6376 5.4.1), minus
# Received and other fields that hops add or rewrite.
SIGNED_HEADERS = (
    b"from",
    b"sender",
    b"reply-to",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"list-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
)
# Listed once more than they occur, so nobody can add another one unnoticed
# (RFC 6376 8.15): the fields a message has at most one of.
OVERSIGNED_HEADERS = (
    b"from",
    b"sender",
    b"reply-to",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
)
_TAG_RE = re.compile(rb"(?:^|;)\s*([ds])\s*=\s*([^;\s]+)")
_KEY_CACHE_LIMIT = 1024


def _header_fields(message: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-cased name, unfolded value) of each header field."""
    fields: list[tuple[bytes, bytes]] = []
    for line in header_section(message, scan_limit=None).split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)
        elif b":" in line:
            name, _, value = line.partition(b":")
            fields.append((name.strip().lower(), value))
    return fields


def _signed_by(fields: list[tuple[bytes, bytes]], domain: bytes, selector: bytes) -> bool:
    for name, value in fields:
        if name == b"dkim-signature":
            tags = dict(_TAG_RE.findall(value.replace(b"\r\n", b"")))
            if tags.get(b"d", b"").lower() == domain and tags.get(b"s") == selector:
                return True
    return False


class DkimSigner:
    def __init__(self) -> None:
        self._keys: dict[str, SigningKey] = {}

    def _key(self, private_key_pem: str) -> SigningKey:
        key = self._keys.get(private_key_pem)
        if key is None:
            if len(self._keys) >= _KEY_CACHE_LIMIT:
                self._keys.clear()
            key = self._keys[private_key_pem] = signing_key(private_key_pem)
        return key

    def sign(self, message: bytes, domain: CompiledDomain | None) -> bytes:
        """message with a DKIM-Signature per key of the domain prepended.

        The first key's signature is the topmost field, so a verifier that
        looks at one signature only sees the first key listed. Mail is never
        held back for want of a signature: a key that cannot sign (no From,
        broken header syntax) is left out with a warning.
        """
        if domain is None or not domain.dkim_keys:
            return message
        fields = _header_fields(message)
        present = {field for field, _ in fields}
        include = [h for h in SIGNED_HEADERS if h in present]
        include += [h for h in OVERSIGNED_HEADERS if h in present]
        name = domain.domain.encode()
        signatures = [
            self._signature(message, name, key, include)
            for key in domain.dkim_keys
            # Signed by us already on an earlier pass through a relay.
            if not _signed_by(fields, name, key.selector.encode())
        ]
        return b"".join(signatures) + message

    def _signature(
        self, message: bytes, domain: bytes, key: CompiledDkimKey, include: list[bytes]
    ) -> bytes:
        try:
            signing = self._key(key.private_key)
            return bytes(
                dkim.DKIM(message, linesep=b"\r\n").sign(
                    key.selector.encode(),
                    domain,
                    signing.key,
                    signature_algorithm=signing.algorithm,
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=include,
                )
            )
        except (DkimKeyError, dkim.DKIMException) as error:
            log.warning(
                "sending without the DKIM signature of %s for %s: %s",
                key.selector,
                domain.decode(),
                error,
            )
            return b""
