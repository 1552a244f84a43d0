"""HOST:PORT strings as flags spell them ('127.0.0.1:2525', '[::1]:25', ':25')."""

from __future__ import annotations


def parse_host_port(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    host = host.removeprefix("[").removesuffix("]") or default_host
    return host, int(port)


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
