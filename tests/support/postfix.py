"""Debian's Postfix as a submitting client: the benchmark's private instance
(bench.systems.Postfix) with the relay under test as its relayhost, fed by
Postfix's own sendmail(1). Its smtp client then speaks to the relay as
Postfix does to any relayhost (EHLO, PIPELINING, the DSN parameters when
offered). Needs root, as Postfix does.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bench.systems import Postfix


@asynccontextmanager
async def postfix_client(relay_port: int) -> AsyncIterator[Postfix]:
    # Not under pytest's tmp_path: Postfix's daemons run as the postfix user,
    # who cannot enter its private (0700) directories; and under /var, where
    # Postfix lets maillog_file be.
    with tempfile.TemporaryDirectory(dir="/var/tmp") as workdir:
        Path(workdir).chmod(0o755)
        postfix = Postfix(Path(workdir) / "postfix", relay_port)
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
