"""Test certificates from the openssl command line: a CA, a server and a client certificate."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _key(path: Path) -> None:
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )


def issue(directory: Path, ca: Path, ca_key: Path, name: str, san: str) -> tuple[Path, Path]:
    """A certificate for name (with subjectAltName san) signed by ca; (cert, key)."""
    key, request, cert = (
        directory / f"{name}.key",
        directory / f"{name}.csr",
        directory / f"{name}.crt",
    )
    _key(key)
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(request))
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    _key(ca_key)
    _openssl(
        "req", "-x509", "-new", "-key", str(ca_key), "-subj", "/CN=kurrier test CA",
        "-days", "2", "-out", str(ca),
    )  # fmt: skip
    server_cert, server_key = issue(
        directory, ca, ca_key, "relay.test", "DNS:relay.test,DNS:queue.test,IP:127.0.0.1"
    )
    client_cert, client_key = issue(directory, ca, ca_key, "ingress.test", "DNS:ingress.test")
    return Certificates(ca, server_cert, server_key, client_cert, client_key)
