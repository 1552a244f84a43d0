"""The embedded NATS's users for `kurrier up`: one per component, new passwords every start.

Each password is a file of its own in the data dir (mode 0600), named to its
child by KURRIER_NATS_USER and KURRIER_NATS_PASSWORD_FILE; the server's
configuration holds them all, with each user's permissions
(kurrier.core.nats_access). Passwords made at every start need no rotation:
restarting `kurrier up` rotates them.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kurrier.core.nats_access import COMPONENTS, permissions
from kurrier.core.private_files import private_directory, write_private
from kurrier.core.settings import NATS_PASSWORD_FILE, NATS_USER


@dataclass(frozen=True)
class NatsUsers:
    """The users' password files, in one directory."""

    directory: Path

    @classmethod
    def create(cls, directory: Path) -> NatsUsers:
        """A new random password for every component."""
        private_directory(directory)
        for user in COMPONENTS:
            write_private(directory / user, secrets.token_urlsafe(32).encode())
        return cls(directory)

    def password(self, user: str) -> str:
        return (self.directory / user).read_text()

    def environment(self, user: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """A child's environment: the given one (default: this process's) and its login."""
        return {
            **(os.environ if environ is None else environ),
            NATS_USER.variable: user,
            NATS_PASSWORD_FILE.variable: str(self.directory / user),
        }

    def authorization(self) -> str:
        """nats-server's `authorization` block (its configuration takes JSON)."""
        users = [
            {"user": user, "password": self.password(user), "permissions": permissions(user)}
            for user in COMPONENTS
        ]
        return "authorization " + json.dumps({"users": users}, indent=2) + "\n"
