"""`kurrier sink`: a development SMTP server that files every message it receives.

Each message becomes NAME.eml (the exact bytes received) beside NAME.json (the
envelope), written atomically so a reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session
from kurrier.core.addresses import parse_host_port
from kurrier.core.lifecycle import stop_event
from kurrier.ingress.handler import peer_ip


class SinkHandler:
    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._counter = itertools.count()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        name = f"{time.time_ns()}-{os.getpid()}-{next(self._counter)}"
        envelope_doc = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "peer": peer_ip(session),
            "helo": session.host_name,
        }
        content = envelope.original_content or b""
        _write_atomically(self._directory / f"{name}.json", json.dumps(envelope_doc).encode())
        _write_atomically(self._directory / f"{name}.eml", content)
        return f"250 2.0.0 Ok: filed as {name}"


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_suffix(path.suffix + ".part")
    partial.write_bytes(data)
    partial.rename(path)


async def run_sink(listen: str, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    stop = stop_event()
    handler = SinkHandler(directory)
    host, port = parse_host_port(listen, default_host="127.0.0.1")
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(
            handler,
            hostname="kurrier-sink",
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=None,
        ),
        host,
        port,
        reuse_address=True,
    )
    print(f"kurrier sink listening on {listen}, filing into {directory}", flush=True)
    await stop.wait()
    server.close()
