"""Files only their owner may read: `kurrier up`'s keys, passwords and the NATS config."""

from __future__ import annotations

import os
from pathlib import Path


def private_directory(path: Path) -> Path:
    """A directory only its owner may enter (made so, if it already existed)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, never readable by others for a moment."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
