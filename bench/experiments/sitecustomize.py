"""Optimisation experiments on kurrier's services, without editing them.

With this folder first on PYTHONPATH, every Python process of `kurrier up`
imports this module at start-up and applies the experiments named in
KURRIER_BENCH_EXPERIMENTS (comma separated). `python -m bench.run --systems
kurrier,kurrier+uvloop,...` sets both, so an idea's gain is measured before
it lands in the services. These are prototypes for measurement, not production code.
"""

from __future__ import annotations

import importlib
import os

# Every experiment below, by the name a system `kurrier+NAME` gives it.
KNOWN = frozenset(
    {
        "uvloop",
        "lean-requests",
        "grpc-window",
        "nats-buffer",
        "grpc-plaintext",
        "grpc-frames",
        "grpc-reads",
        "delivery-nice",
        "delivery-nice5",
        "delivery-batch",
        "enqueue-batch256",
        "enqueue-batch128",
    }
)

_CHOSEN = {name for name in os.environ.get("KURRIER_BENCH_EXPERIMENTS", "").split(",") if name}

if "uvloop" in _CHOSEN:
    importlib.import_module("uvloop").install()

if "lean-requests" in _CHOSEN:
    # nats-py's request: a NUID and os.urandom per token, asyncio.wait_for, a done
    # callback; here a counter, asyncio.timeout and a finally.
    import asyncio
    import itertools
    from typing import Any

    from nats import errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg

    _tokens = itertools.count()

    async def _lean_request(
        self: Client,
        subject: str,
        payload: bytes,
        timeout: float = 1,
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        if self.is_draining_pubs:
            raise errors.ConnectionDrainingError
        if not self._resp_sub_prefix:
            await self._init_request_sub()
        assert self._resp_sub_prefix is not None
        token = str(next(_tokens))
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._resp_map[token] = future
        try:
            await self.publish(
                subject, payload, reply=self._resp_sub_prefix.decode() + token, headers=headers
            )
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError as error:
            raise errors.TimeoutError from error
        finally:
            self._resp_map.pop(token, None)

    Client._request_new_style = _lean_request  # type: ignore[method-assign]

if "grpc-window" in _CHOSEN:
    # A stream window of 4 MiB from the start on both sides of ingress -> queue, so
    # a 100 KB request never waits for a WINDOW_UPDATE mid-message (gRPC's own
    # starts at 64 KiB and grows by probing the bandwidth-delay product).
    from kurrier.core import grpc_tls

    _WINDOW = (("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),)
    grpc_tls.CHANNEL_OPTIONS = (*grpc_tls.CHANNEL_OPTIONS, *_WINDOW)
    grpc_tls.SERVER_OPTIONS = (*grpc_tls.SERVER_OPTIONS, *_WINDOW)

if "nats-buffer" in _CHOSEN:
    # nats-py reads 32 KiB at a time into a StreamReader limited to 32 KiB, which
    # pauses the socket past 64 KiB: a 100 KB body's direct get is read in pieces,
    # with a pause and a resume between them. 1 MiB holds any inline body whole.
    import nats.aio.client

    nats.aio.client.DEFAULT_BUFFER_SIZE = 1 << 20

if "grpc-plaintext" in _CHOSEN:
    # The ingress -> queue hop without TLS, to price its encryption and record framing
    # both ways; the queue then checks no caller identity (no client certificate).
    import grpc
    import grpc.aio._server
    from kurrier.core import grpc_tls

    def _plain_channel(
        self: grpc_tls.QueueTls,
        address: str,
        options: grpc_tls.ChannelOptions = (),
        pair: object = None,
    ) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address, options=[*grpc_tls.CHANNEL_OPTIONS, *options])

    def _plain_port(self: grpc.aio._server.Server, address: str, credentials: object) -> int:
        port: int = self.add_insecure_port(address)
        return port

    grpc_tls.QueueTls.channel = _plain_channel  # type: ignore[method-assign]
    grpc_tls.GrpcTls.knows_clients = property(lambda self: False)  # type: ignore[assignment,method-assign]
    grpc.aio._server.Server.add_secure_port = _plain_port

if "grpc-frames" in _CHOSEN:
    # A 100 KB request in one HTTP/2 DATA frame: each side advertises 1 MiB as the
    # largest frame it takes (gRPC's own is 16 KiB).
    from kurrier.core import grpc_tls

    _FRAMES = (("grpc.http2.max_frame_size", 1 << 20),)
    grpc_tls.CHANNEL_OPTIONS = (*grpc_tls.CHANNEL_OPTIONS, *_FRAMES)
    grpc_tls.SERVER_OPTIONS = (*grpc_tls.SERVER_OPTIONS, *_FRAMES)

if "grpc-reads" in _CHOSEN:
    # gRPC's socket reads from 64 KiB up, starting at 256 KiB (its own start at
    # 8 KiB, may shrink to 256 bytes, and grow as reads fill).
    from kurrier.core import grpc_tls

    _READS = (
        ("grpc.experimental.tcp_read_chunk_size", 256 * 1024),
        ("grpc.experimental.tcp_min_read_chunk_size", 64 * 1024),
    )
    grpc_tls.CHANNEL_OPTIONS = (*grpc_tls.CHANNEL_OPTIONS, *_READS)
    grpc_tls.SERVER_OPTIONS = (*grpc_tls.SERVER_OPTIONS, *_READS)

if _CHOSEN & {"delivery-nice", "delivery-nice5", "delivery-batch"}:
    # Delivery yields the CPU to the accept path (ingress, queue, nats-server):
    # with 10 sessions an accept waits on CPUs the machine has idle on average.
    with open("/proc/self/cmdline", "rb") as _cmdline:
        _args = _cmdline.read().split(b"\0")
    if b"kurrier.cli" in _args and _args[_args.index(b"kurrier.cli") + 1] == b"delivery":
        if "delivery-batch" in _CHOSEN:
            # Same share of the CPU; its wake-ups preempt no one.
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        else:
            os.nice(10 if "delivery-nice" in _CHOSEN else 5)

if "enqueue-batch256" in _CHOSEN or "enqueue-batch128" in _CHOSEN:
    # Smaller gRPC writes from ingress for large bodies, so the queue stores the
    # first messages while the next are still on the wire.
    from kurrier.ingress import enqueue_stream

    enqueue_stream.BATCH_LIMIT = (256 if "enqueue-batch256" in _CHOSEN else 128) * 1024
