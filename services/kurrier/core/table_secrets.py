"""The routing table's secrets, sealed in NATS KV for the one component that uses each.

Every service reads the same table, but each secret in it has one reader:
smarthost passwords and DKIM private keys are delivery's, users' password
hashes are ingress's. Each reader has a key of its own (32 random bytes,
`<reader>.key` in the directory `KURRIER_TABLE_KEYS` names, base64); the
publisher (operator, `kurrier up`) holds all of them. A secret is stored as
`sealed:v1:<reader>:<base64 of nonce + AES-256-GCM ciphertext>`, bound by its
associated data to the field it sits in, so a sealed value moved to another
field or another reader does not open.

A reader opens what it has a key for and drops the rest: ingress never holds
a smarthost password, delivery never a password hash, the queue none. A
publisher without keys stores the secrets in clear, and says so in the log.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from kurrier.core.private_files import private_directory, write_private
from kurrier.core.routing import RoutingTable
from kurrier.core.settings import TABLE_KEYS

log = logging.getLogger(__name__)

DELIVERY = "delivery"  # smarthost passwords, DKIM private keys
INGRESS = "ingress"  # users' password hashes
READERS = (DELIVERY, INGRESS)
_PREFIX = "sealed:v1:"
_NONCE_SIZE = 12
KEY_SIZE = 32


class TableKeyError(Exception):
    """A key file that is not 32 bytes in base64."""


@dataclass(frozen=True)
class TableKeys:
    """The keys this process holds, by reader."""

    keys: Mapping[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_directory(cls, directory: Path) -> TableKeys:
        keys = {}
        for reader in READERS:
            path = directory / f"{reader}.key"
            if path.is_file():
                keys[reader] = _decode_key(path)
        return cls(keys)

    @classmethod
    def from_environment(cls) -> TableKeys:
        directory = os.environ.get(TABLE_KEYS.variable)
        return cls.from_directory(Path(directory)) if directory else cls()


def new_key() -> str:
    """A fresh key, as a key file holds it."""
    return base64.b64encode(AESGCM.generate_key(bit_length=8 * KEY_SIZE)).decode()


PUBLISHER = "publisher"


def local_key_directories(directory: Path) -> dict[str, Path]:
    """`kurrier up`'s keys: one per reader, made once and kept (the table in the data
    dir outlives a restart), in a directory per holder: each reader's own, and the
    publisher's with all of them. The directory for each holder, by name."""
    holders = {name: directory / name for name in (*READERS, PUBLISHER)}
    for path in holders.values():
        private_directory(path)
    for reader in READERS:
        own = holders[reader] / f"{reader}.key"
        if not own.is_file():
            write_private(own, new_key().encode())
        published = holders[PUBLISHER] / f"{reader}.key"
        if not published.is_file() or published.read_text() != own.read_text():
            write_private(published, own.read_bytes())
    return holders


def _decode_key(path: Path) -> bytes:
    try:
        key = base64.b64decode(path.read_text().strip(), validate=True)
    except (binascii.Error, ValueError):
        raise TableKeyError(f"{path}: not base64") from None
    if len(key) != KEY_SIZE:
        raise TableKeyError(f"{path}: {len(key)} bytes, not {KEY_SIZE}")
    return key


def _seal(key: bytes, reader: str, value: str, where: str) -> str:
    nonce = os.urandom(_NONCE_SIZE)
    sealed = AESGCM(key).encrypt(nonce, value.encode(), f"{reader} {where}".encode())
    return f"{_PREFIX}{reader}:{base64.b64encode(nonce + sealed).decode()}"


def _open(keys: TableKeys, value: str, where: str) -> str | None:
    """The clear value; None when it is sealed for a reader whose key this process lacks."""
    if not value.startswith(_PREFIX):
        return value  # stored by a publisher without keys
    reader, _, payload = value[len(_PREFIX) :].partition(":")
    key = keys.keys.get(reader)
    if key is None:
        return None
    try:
        raw = base64.b64decode(payload)
        opened = AESGCM(key).decrypt(
            raw[:_NONCE_SIZE], raw[_NONCE_SIZE:], f"{reader} {where}".encode()
        )
    except (binascii.Error, ValueError, InvalidTag):
        log.error("a sealed secret of the routing table (%s) does not open with our key", where)
        return None
    return opened.decode()


def _secrets(document: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, str]]:
    """Every secret field of a table as JSON: (reader, its container, its key, where)."""
    found = []
    for route in document.get("routes", []):
        if route.get("password") is not None:
            found.append((DELIVERY, route, "password", f"route {route['name']} password"))
    for domain in document.get("domains", []):
        for key in domain.get("dkim_keys", []):
            where = f"domain {domain['domain']} dkim {key['selector']}"
            found.append((DELIVERY, key, "private_key", where))
    users = document.get("policy", {}).get("users", {})
    for user in users:
        found.append((INGRESS, users, user, f"user {user}"))
    return found


def seal_table(table: RoutingTable, keys: TableKeys) -> bytes:
    """The table as stored: JSON with each secret sealed for its reader, and without
    the fields left at their defaults (the routing table's compatibility rule,
    docs/architecture.md: a pod of the version before reads a table that uses
    nothing added since)."""
    document = table.model_dump(mode="json", exclude_defaults=True)
    in_clear = 0
    for reader, container, name, where in _secrets(document):
        key = keys.keys.get(reader)
        if key is None:
            in_clear += 1
        else:
            container[name] = _seal(key, reader, container[name], where)
    if in_clear:
        log.warning(
            "%d secret(s) of the routing table stored in clear: no key for their reader in %s",
            in_clear,
            TABLE_KEYS.variable,
        )
    return RoutingTable.model_validate(document).model_dump_json(exclude_defaults=True).encode()


def open_table(stored: bytes, keys: TableKeys) -> RoutingTable:
    """The table with the secrets this process may read in clear and the others left out:
    a route's password not ours is None, a DKIM key or a user not ours is dropped.
    Raises pydantic's ValidationError for a document that is not a table."""
    document = RoutingTable.model_validate_json(stored).model_dump(mode="json")
    for _, container, name, where in _secrets(document):
        container[name] = _open(keys, container[name], where)
    policy = document["policy"]
    policy["users"] = {user: hashed for user, hashed in policy["users"].items() if hashed}
    for domain in document["domains"]:
        domain["dkim_keys"] = [key for key in domain["dkim_keys"] if key["private_key"]]
    return RoutingTable.model_validate(document)
