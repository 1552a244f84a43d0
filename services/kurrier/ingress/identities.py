"""Who an AUTH login is: a user of the policy's users Secret, or a ServiceAccount token.

User passwords are checked against bcrypt or argon2 hashes, never stored or
compared in plain text. Hashing is deliberately slow CPU work, so it runs in
worker threads, a few at a time, off the event loop that serves every session.
"""

from __future__ import annotations

import asyncio
import logging

import argon2
import bcrypt
from kurrier.core.routing import CompiledPolicy, password_hash_scheme
from kurrier.ingress.token_review import Review, TokenReviewer, looks_like_token

log = logging.getLogger(__name__)

CONCURRENT_HASHES = 4
# Unknown users are checked against this, so a reply's timing does not tell
# whether the user exists.
_DECOY_PASSWORD = b"kurrier-decoy-password"


def password_matches(stored: str, password: bytes) -> bool:
    scheme = password_hash_scheme(stored)
    try:
        if scheme == "bcrypt":
            return bcrypt.checkpw(password, stored.encode())
        if scheme == "argon2":
            return argon2.PasswordHasher().verify(stored, password)
    except (ValueError, argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        # A mismatch, a malformed hash, or a password bcrypt cannot take (over 72 octets).
        return False
    return False


class Identities:
    def __init__(self, reviewer: TokenReviewer | None) -> None:
        self._reviewer = reviewer
        self._slots = asyncio.Semaphore(CONCURRENT_HASHES)
        self._decoy = bcrypt.hashpw(_DECOY_PASSWORD, bcrypt.gensalt(rounds=10)).decode()
        self._warned_no_api = False

    async def verify(self, policy: CompiledPolicy, login: bytes, password: bytes) -> str | Review:
        """The identity AUTH proved, or why it proved none."""
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            name = ""
        stored = policy.users.get(name) if name else None
        if stored is None and policy.service_account_audience and looks_like_token(password):
            # The identity is the token's; the login name a client sends with it is ignored.
            if self._reviewer is None:
                if not self._warned_no_api:
                    log.error("ServiceAccount token offered, but no API server is configured")
                    self._warned_no_api = True
                return Review.UNAVAILABLE
            return await self._reviewer.review(password, policy.service_account_audience)
        async with self._slots:
            matches = await asyncio.to_thread(password_matches, stored or self._decoy, password)
        return name if stored is not None and matches else Review.REJECTED
