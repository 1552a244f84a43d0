"""Debian's Postfix in tests: the benchmark's private instance
(bench.systems.Postfix), relaying everything it takes to one port.

As a submitting client, fed by Postfix's own sendmail(1), it speaks to the
relay under test as Postfix does to any relayhost (EHLO, PIPELINING, the
DSN parameters when offered); as a next hop it stands in for an older MTA.
Needs root, as Postfix does.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bench.systems import Postfix


@asynccontextmanager
async def private_postfix(
    relayhost_port: int, settings: dict[str, str] | None = None
) -> AsyncIterator[Postfix]:
    """A running Postfix relaying to 127.0.0.1:relayhost_port; settings go into main.cf."""
    # Not under pytest's tmp_path: Postfix's daemons run as the postfix user,
    # who cannot enter its private (0700) directories; and under /var, where
    # Postfix lets maillog_file be.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as workdir:
        Path(workdir).chmod(0o755)
        postfix = Postfix(Path(workdir) / "postfix", relayhost_port, settings)
        await postfix.start()
        try:
            yield postfix
        finally:
            await postfix.stop()


def sendmail(
    postfix: Postfix, sender: str, recipients: list[str], message: bytes, *options: str
) -> None:
    """Postfix's sendmail(1) with options (e.g. -N success,delay -V ID -R hdrs)."""
    subprocess.run(
        ["sendmail", "-C", str(postfix.config_dir), "-f", sender, *options, "--", *recipients],
        input=message,
        check=True,
        capture_output=True,
        timeout=30,
    )


def postfix_log(postfix: Postfix) -> str:
    return (postfix.workdir / "log" / "postfix.log").read_text(errors="replace")
