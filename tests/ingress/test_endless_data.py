"""A gigabyte of DATA and an endless line against a 1 MiB limit: ingress memory stays flat."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ingress.smtp_probe import SmtpProbe
from tests.support.nats import NatsServer
from tests.support.relay import ServiceRelay, documents, inbound_domain, route

GIB = 1024**3
CHUNK = 1024 * 1024


def _peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory, in bytes (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def small_limit_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceRelay]:
    workdir = tmp_path_factory.mktemp("endless")
    nats = NatsServer(workdir / "nats-store", workdir)
    nats.start()
    relay = ServiceRelay(workdir, nats.url)
    policy = textwrap.dedent("""\
        apiVersion: kurrier.io/v1alpha1
        kind: RelayPolicy
        metadata: {name: small}
        spec: {maxMessageSize: 1048576}""")
    relay.publish(documents(inbound_domain("example.com"), route("r", ["*"], 9), policy))
    try:
        with relay:
            yield relay
    finally:
        nats.stop()


@pytest.mark.parametrize(
    ("total", "line", "refusal"),
    [
        (GIB, b"x" * 998 + b"\r\n", "552 5.3.4"),
        (GIB // 4, b"x" * 4096, "552 5.6.0"),  # one endless line, never a CRLF
    ],
    ids=["1GiB-of-lines", "endless-line"],
)
def test_endless_data_is_drained_in_constant_memory(
    small_limit_relay: ServiceRelay, total: int, line: bytes, refusal: str
) -> None:
    ingress = small_limit_relay.processes["ingress"].pid
    before = _peak_rss(ingress)
    chunk = line * (CHUNK // len(line))
    with SmtpProbe(small_limit_relay.smtp_port, timeout=120) as smtp:
        smtp.reply()
        smtp.command("EHLO probe.test")
        assert smtp.command("MAIL FROM:<a@client.test>").code == 250
        assert smtp.command("RCPT TO:<user@example.com>").code == 250
        assert smtp.command("DATA").code == 354
        smtp.send(b"Subject: big\r\n\r\n")
        for _ in range(total // len(chunk)):
            smtp.send(chunk)
        smtp.send(b"\r\n.\r\n")
        assert smtp.reply().startswith(refusal)
        assert smtp.command("NOOP").code == 250, "the session survives the refusal"
    growth = _peak_rss(ingress) - before
    assert growth < 32 * 1024 * 1024, f"ingress peak memory grew by {growth // 1024} KiB"
