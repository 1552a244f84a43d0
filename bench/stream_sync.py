"""How many synced publishes a second JetStream takes into one stream, and into several.

`python -m bench.stream_sync` starts a nats-server (one node, JetStream with
`sync_interval` as given, `always` by default) and publishes 1 KB messages
from 40 concurrent publishers for a few seconds, first all into one stream,
then spread over two and four streams, repeating the set. A stream that
syncs every write stores one message at a time, so its rate is about one
over the disk's sync time whatever the publishers do; streams sync side by
side. Every kurrier message writes its record stream and its jobs stream
twice each (stored, then removed), so this sets the ceiling of a node.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import nats
from kurrier.cli.nats_server import nats_server_binary
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

PUBLISHERS = 40
PAYLOAD = b"x" * 1024


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _rate(js: JetStreamContext, streams: int, seconds: float) -> float:
    published = 0
    stop = time.monotonic() + seconds

    async def publisher(n: int) -> None:
        nonlocal published
        subject = f"sync{n % streams}.m"
        while time.monotonic() < stop:
            await js.publish(subject, PAYLOAD)
            published += 1

    await asyncio.gather(*(publisher(n) for n in range(PUBLISHERS)))
    return published / seconds


async def _measure(url: str, counts: list[int], seconds: float, repeats: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for n in range(max(counts)):
            config = StreamConfig(
                name=f"SYNC{n}", subjects=[f"sync{n}.>"], storage=StorageType.FILE
            )
            await js.add_stream(config)
        print("| repeat | streams | publishes/s | against one stream |")
        print("|---:|---:|---:|---:|")
        for repeat in range(1, repeats + 1):
            one = 0.0
            for streams in counts:
                rate = await _rate(js, streams, seconds)
                one = one or rate
                print(f"| {repeat} | {streams} | {rate:.0f} | {rate / one:.2f}x |", flush=True)
    finally:
        await nc.close()


async def _wait_and_measure(url: str, seconds: float, repeats: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            await (await nats.connect(url, allow_reconnect=False)).close()
            break
        except (OSError, nats.errors.Error):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    await _measure(url, [1, 2, 4], seconds, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sync", default="always", help="nats-server's sync_interval")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each trial")
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="stream-sync-") as work:
        config = Path(work) / "nats.conf"
        config.write_text(
            f"listen: 127.0.0.1:{port}\n"
            f'jetstream {{ store_dir: "{work}/store", sync_interval: {arguments.sync} }}\n'
        )
        server = subprocess.Popen(
            [nats_server_binary(), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"nats://127.0.0.1:{port}"
            asyncio.run(_wait_and_measure(url, arguments.seconds, arguments.repeats))
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
