"""How many synced publishes a second JetStream takes into one stream, and into several.

`python -m bench.stream_sync` starts a nats-server (one node, JetStream with
`sync_interval` as given, `always` by default) and publishes 1 KB messages
from 40 concurrent publishers (`--publishers`) for a few seconds, first all
into one stream, then spread over two and four streams, repeating the set.
With `--nodes 3` three servers form a cluster on loopback and every stream
has three replicas. A stream that syncs every write stores one message at
a time, so its rate is about one over the disk's sync time whatever the
publishers do; streams sync side by side. Every kurrier message writes its
record stream and its jobs stream twice each (stored, then removed), so
this sets the ceiling of a node.

Then the same publishers write into one stream in atomic batches (ADR-50,
nats-server 2.12+: `Nats-Batch-Id`, `Nats-Batch-Sequence`,
`Nats-Batch-Commit`), each publisher its own batches of 10, 40 and 200
messages, against plain publishes into that stream: whether a batch is
stored with one sync, which would let concurrent messages share their
writes.

Last, each publisher stores one "message" at a time as kurrier stores a
record and its first job before a `250`: a publish into one stream, then
one into another (as kurrier does), both into one stream in turn, or both
as one atomic batch of two into one stream: what one wait for a batch
would save against two waits in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import nats
from kurrier.cli.nats_server import nats_server_binary
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

PUBLISHERS = 40
PAYLOAD = b"x" * 1024
BATCH_SIZES = [1, 10, 40, 200]
PAIRS = ["two streams in turn", "one stream in turn", "one batch of two"]
T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _rate(publish: Callable[[], Awaitable[int]], seconds: float, publishers: int) -> float:
    """Messages stored a second by that many concurrent loops of publish(), each
    call returning how many messages it stored."""
    published = 0
    stop = time.monotonic() + seconds

    async def publisher() -> None:
        nonlocal published
        while time.monotonic() < stop:
            # Not `published += await publish()`: that reads the count before the
            # await, and concurrent publishers would overwrite each other's.
            stored = await publish()
            published += stored

    await asyncio.gather(*(publisher() for _ in range(publishers)))
    return published / seconds


async def _table(
    column: str,
    baseline: str,
    values: Sequence[T],
    rate_of: Callable[[T], Awaitable[float]],
    repeats: int,
) -> None:
    """A Markdown table of rate_of(value) for each value, repeats times, each
    against the first value's rate in the same repeat."""
    print(f"| repeat | {column} | publishes/s | against {baseline} |")
    print("|---:|---:|---:|---:|")
    for repeat in range(1, repeats + 1):
        first = 0.0
        for value in values:
            rate = await rate_of(value)
            first = first or rate
            print(f"| {repeat} | {value} | {rate:.0f} | {rate / first:.2f}x |", flush=True)


async def _publish_batch(nc: Client, subject: str, size: int) -> None:
    """One atomic batch of size messages: the first and the commit are requests
    (the server answers the first once the batch is open, the commit with its
    PubAck), the ones between plain publishes. A batch of one is a plain
    publish, the baseline."""
    if size == 1:
        await nc.jetstream().publish(subject, PAYLOAD)
        return
    batch = uuid.uuid4().hex
    for sequence in range(1, size + 1):
        headers = {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(sequence)}
        if sequence == size:
            headers["Nats-Batch-Commit"] = "1"
        if sequence in (1, size):
            reply = await nc.request(subject, PAYLOAD, timeout=10, headers=headers)
            if b'"error"' in reply.data:
                raise RuntimeError(f"batch refused: {reply.data!r}")
        else:
            await nc.publish(subject, PAYLOAD, headers=headers)


async def _add_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Add a stream, asking again while a new cluster elects its meta leader."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await js.add_stream(config)
            return
        except (nats.errors.Error, nats.js.errors.Error):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _measure_batches(
    nc: Client, seconds: float, repeats: int, publishers: int, replicas: int
) -> None:
    config = StreamConfig(
        name="ATOMIC",
        subjects=["atomic.>"],
        storage=StorageType.FILE,
        allow_atomic=True,
        num_replicas=replicas,
    )
    await _add_stream(nc.jetstream(), config)

    async def in_batches(size: int) -> float:
        async def one_batch() -> int:
            await _publish_batch(nc, "atomic.m", size)
            return size

        return await _rate(one_batch, seconds, publishers)

    print()
    await _table("batch size", "plain publishes", BATCH_SIZES, in_batches, repeats)

    js = nc.jetstream()

    async def in_pairs(way: str) -> float:
        async def one_message() -> int:
            if way == PAIRS[2]:
                await _publish_batch(nc, "atomic.m", 2)
                return 1
            await js.publish("sync0.record", PAYLOAD)
            await js.publish("sync1.job" if way == PAIRS[0] else "sync0.job", PAYLOAD)
            return 1

        return await _rate(one_message, seconds, publishers)

    print()
    await _table("a record and its job", PAIRS[0], PAIRS, in_pairs, repeats)


async def _measure(
    url: str, counts: list[int], seconds: float, repeats: int, publishers: int, replicas: int
) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for n in range(max(counts)):
            config = StreamConfig(
                name=f"SYNC{n}",
                subjects=[f"sync{n}.>"],
                storage=StorageType.FILE,
                num_replicas=replicas,
            )
            await _add_stream(js, config)

        async def over_streams(streams: int) -> float:
            # Turn by turn over the streams, so even one publisher writes each.
            turns = itertools.count()

            async def one_publish() -> int:
                await js.publish(f"sync{next(turns) % streams}.m", PAYLOAD)
                return 1

            return await _rate(one_publish, seconds, publishers)

        await _table("streams", "one stream", counts, over_streams, repeats)
        await _measure_batches(nc, seconds, repeats, publishers, replicas)
    finally:
        await nc.close()


async def _wait_and_measure(
    url: str, seconds: float, repeats: int, publishers: int, replicas: int
) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            await (await nats.connect(url, allow_reconnect=False)).close()
            break
        except (OSError, nats.errors.Error):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    await _measure(url, [1, 2, 4], seconds, repeats, publishers, replicas)


def _server_configs(work: Path, nodes: int, sync: str) -> tuple[list[Path], str]:
    """Each server's config file (a cluster on loopback when nodes > 1), and a client URL."""
    ports = [_free_port() for _ in range(nodes)]
    routes = [_free_port() for _ in range(nodes)]
    configs = []
    for index in range(nodes):
        text = (
            f"listen: 127.0.0.1:{ports[index]}\n"
            f"server_name: n{index}\n"
            f'jetstream {{ store_dir: "{work}/n{index}", sync_interval: {sync} }}\n'
        )
        if nodes > 1:
            others = ", ".join(f"nats://127.0.0.1:{p}" for p in routes if p != routes[index])
            text += (
                f"cluster {{ name: sync, listen: 127.0.0.1:{routes[index]}, routes: [{others}] }}\n"
            )
        config = work / f"n{index}.conf"
        config.write_text(text)
        configs.append(config)
    return configs, f"nats://127.0.0.1:{ports[0]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sync", default="always", help="nats-server's sync_interval")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each trial")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--publishers", type=int, default=PUBLISHERS, help="concurrent publishers, one connection"
    )
    parser.add_argument("--nodes", type=int, choices=[1, 3], default=1)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stream-sync-") as work:
        configs, url = _server_configs(Path(work), arguments.nodes, arguments.sync)
        servers = [
            subprocess.Popen(
                [nats_server_binary(), "-c", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for config in configs
        ]
        try:
            asyncio.run(
                _wait_and_measure(
                    url, arguments.seconds, arguments.repeats, arguments.publishers, arguments.nodes
                )
            )
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.wait()


if __name__ == "__main__":
    main()
