"""The jobs stream: unsynced on one node, replicated with atomic batches on three.

On one node a job is stored in nats-server's async persist mode (no sync per
write; unsynced_jobs in core/jetstream.py says why that loses nothing
accepted), which takes no atomic batches; with replicas it is an ordinary
stream that does. nats-server fixes a stream's persist mode when it is
created: a queue asked for another shape keeps the stream, says what to do,
and starts.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from kurrier.core.jetstream import (
    DISPATCH_STREAM,
    MESSAGES_STREAM,
    connect,
    disconnect,
    ensure_layout,
    when_answered,
)
from nats.js.api import PersistMode, StreamConfig

from tests.support.nats import NatsCluster, NatsServer, cluster_layout_error
from tests.support.processes import wait_until


async def _config(url: str, stream: str) -> StreamConfig:
    nc = await connect(url, "test-jobs-stream")
    try:
        return (await nc.jetstream().stream_info(stream)).config
    finally:
        await disconnect(nc)


async def test_one_nodes_jobs_stream_is_unsynced_and_its_records_are_not(
    nats_server: NatsServer,
) -> None:
    nc = await connect(nats_server.url, "test-jobs-stream")
    try:
        js = nc.jetstream()
        await ensure_layout(js, 1, owner=True)
        await ensure_layout(js, 1, owner=True)  # again, as every queue start does
        jobs = (await js.stream_info(DISPATCH_STREAM)).config
        records = (await js.stream_info(MESSAGES_STREAM)).config
    finally:
        await disconnect(nc)
    assert jobs.persist_mode == PersistMode.ASYNC
    assert not jobs.allow_atomic
    assert records.persist_mode in (None, PersistMode.DEFAULT)
    assert records.allow_atomic


async def _one_node_stream_asked_for_three(url: str) -> StreamConfig:
    """The jobs stream made for one node, then laid out for three by its owner."""
    nc = await connect(url, "test-jobs-stream")
    try:
        js = nc.jetstream()
        await js.delete_stream(DISPATCH_STREAM)
        await ensure_layout(js, 1, owner=True, streams={DISPATCH_STREAM})
        await when_answered(
            lambda: ensure_layout(js, 3, owner=True, streams={DISPATCH_STREAM}), "the jobs stream"
        )
        await js.publish("kurrier.deliver.KEPT", b"{}", stream=DISPATCH_STREAM)
        return (await js.stream_info(DISPATCH_STREAM)).config
    finally:
        await disconnect(nc)


@pytest.mark.slow
def test_three_nodes_replicate_the_jobs_stream_and_keep_a_single_nodes_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "nats").mkdir()
    cluster = NatsCluster(tmp_path / "nats")
    cluster.start_all()
    try:
        wait_until(lambda: cluster_layout_error(cluster.url()) is None, 60, "the R3 layout")
        jobs = asyncio.run(_config(cluster.url(), DISPATCH_STREAM))
        assert (jobs.num_replicas, jobs.allow_atomic) == (3, True)
        assert jobs.persist_mode in (None, PersistMode.DEFAULT)

        # A one-node stream asked to become three: refused, said, and left working.
        with caplog.at_level(logging.ERROR, logger="kurrier.core.jetstream"):
            kept = asyncio.run(_one_node_stream_asked_for_three(cluster.url()))
        assert (kept.num_replicas, kept.persist_mode) == (1, PersistMode.ASYNC)
        [said] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert f"{DISPATCH_STREAM} keeps its configuration" in said
        assert f"nats stream rm {DISPATCH_STREAM}" in said
    finally:
        cluster.stop_all()
