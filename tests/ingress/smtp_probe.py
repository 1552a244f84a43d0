"""A raw SMTP client for hostile probes: every byte is the test's choice, every reply is read."""

from __future__ import annotations

import base64
import socket
import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def startswith(self, prefix: str) -> bool:
        """'554', '554 5.7.1': compares the last line, as an SMTP client reads a reply."""
        return self.lines[-1].startswith(prefix)


def plain(user: str, password: str, authzid: str = "") -> str:
    """An AUTH PLAIN command line with its initial response."""
    blob = f"{authzid}\0{user}\0{password}".encode()
    return "AUTH PLAIN " + base64.b64encode(blob).decode()


def client_tls() -> ssl.SSLContext:
    """A client that trusts any certificate: these tests check the server, not its name."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class SmtpProbe:
    def __init__(
        self,
        port: int,
        source_ip: str = "127.0.0.1",
        implicit_tls: bool = False,
        timeout: float = 15,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout, source_address=(source_ip, 0))
        self.sock: socket.socket = (
            client_tls().wrap_socket(raw, server_hostname="relay.test") if implicit_tls else raw
        )
        self._buffer = b""

    def __enter__(self) -> SmtpProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Reply:
        lines: list[str] = []
        while True:
            while b"\r\n" not in self._buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed by the server after {lines!r}")
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            text = line.decode("utf-8", errors="replace")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return Reply(int(text[:3]), tuple(lines))

    def command(self, line: str | bytes) -> Reply:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(self) -> Reply:
        answer = self.command("STARTTLS")
        if answer.code == 220:
            assert not self._buffer, "the server sent bytes after 220 before the handshake"
            self.sock = client_tls().wrap_socket(self.sock, server_hostname="relay.test")
        return answer

    def closed_by_server(self, timeout: float = 10) -> bool:
        """Whether the server closes the connection within timeout (what it says is skipped)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except (ConnectionResetError, ssl.SSLError):
            pass
        return True
