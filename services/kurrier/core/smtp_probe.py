"""Waiting until an SMTP server is really up: its 220 banner, not just an open port."""

from __future__ import annotations

import asyncio


async def wait_for_smtp_banner(host: str, port: int, timeout: float) -> None:
    """Return once host:port greets with 220; TimeoutError after timeout seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    banner = await reader.readline()
                    writer.write(b"QUIT\r\n")
                finally:
                    writer.close()
            if banner.startswith(b"220"):
                return
        except (OSError, TimeoutError):
            pass
        if loop.time() > deadline:
            raise TimeoutError(f"no SMTP banner on {host}:{port} within {timeout}s")
        await asyncio.sleep(0.1)
