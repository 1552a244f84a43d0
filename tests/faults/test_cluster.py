"""The distributed case for real: a 3-node JetStream cluster, streams with 3 replicas,
two ingress, two queue and two delivery processes spread over the nodes. Under
load a NATS node dies, then the stream leader, then a queue and a delivery
process; nothing acknowledged may be lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import smtplib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from kurrier.core.jetstream import JOBS_STREAM, connect, disconnect, when_answered

from tests.support.load import SteadyLoad
from tests.support.metrics import value
from tests.support.nats import NatsCluster, cluster_layout_error, stream_leader
from tests.support.processes import eventually, wait_until
from tests.support.relay import (
    SWEPT_WITHIN,
    ServiceRelay,
    UpRelay,
    documents,
    route,
    trusting,
    wait_until_drained,
)
from tests.support.sink import Sink

pytestmark = pytest.mark.slow

REPLICAS = ["--nats-replicas", "3"]
BATCHES = "kurrier_jetstream_batches_total"


def _subject(content: bytes) -> str:
    return content.split(b"Subject: ")[1].split(b"\r\n")[0].decode()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    nats = NatsCluster(tmp_path / "nats")
    (tmp_path / "nats").mkdir()
    nats.start_all()
    yield nats
    nats.stop_all()


def _lose_nothing_through_node_leader_and_worker_loss(
    tmp_path: Path,
    sink: Sink,
    cluster: NatsCluster,
    clients: int = 2,
    batch_args: Sequence[str] = (),
) -> dict[str, float]:
    """Two relays under load while a NATS node dies, then the stream leader, then
    relay 0's queue and delivery; every acknowledged message must arrive. Returns
    the atomic batches stored by relay 1's queue and delivery, which ran throughout."""
    wait_until(lambda: cluster_layout_error(cluster.url()) is None, 60, "JetStream in the cluster")
    config = documents(route("to-sink", ["example.com"], sink.port), trusting("127.0.0.0/8"))
    relays = []
    for index in range(2):
        workdir = tmp_path / f"relay-{index}"
        workdir.mkdir()
        relays.append(
            ServiceRelay(
                workdir,
                cluster.url(first=index),
                metrics=True,
                service_args={
                    "queue": [*REPLICAS, *batch_args],
                    "delivery": [*REPLICAS, *batch_args],
                    "ingress": REPLICAS,
                },
            )
        )
    relays[0].publish(config)
    with contextlib.ExitStack() as running:
        for relay in relays:
            running.enter_context(relay)
        loads = [SteadyLoad(r.smtp_port, "r@example.com", clients=clients).start() for r in relays]
        running.callback(lambda: [load.stop() for load in loads])  # before the relays stop

        def progress(after: str) -> None:
            for number, load in enumerate(loads):
                try:
                    load.wait_for_acknowledged(len(load.ledger.acknowledged) + 20, timeout=120)
                except AssertionError as error:
                    raise AssertionError(f"relay {number} stalled after {after}: {error}") from None

        def restart(name: str) -> None:
            relays[0].processes[name].kill()
            relays[0].processes[name].wait()
            relays[0].start(name)

        progress("start")
        cluster.kill("kurrier-3")
        progress("killing node kurrier-3")
        cluster.start("kurrier-3")
        leader = stream_leader(cluster.url())
        cluster.kill(leader)
        progress(f"killing the stream leader {leader}")
        cluster.start(leader)
        for name in ("queue", "delivery"):
            restart(name)
            progress(f"kill -9 of {name}")
        ledgers = [load.stop() for load in loads]
        acknowledged = set().union(*(ledger.acknowledged for ledger in ledgers))
        wait_until(
            lambda: acknowledged <= {_subject(m.content) for m in sink.messages},
            # A queue killed between a 250 and its first job leaves that message
            # to the sweeper: the bound is the sweeper's (docs/reliability.md).
            SWEPT_WITHIN,
            "every acknowledged message to be delivered",
        )
        wait_until_drained(cluster.url(), SWEPT_WITHIN)
        # Relay 1's queue and delivery ran the whole time: what they batched.
        batches = {
            name: value(relays[1].metrics_ports[name], BATCHES, outcome="stored")
            for name in ("queue", "delivery")
        }
    assert len(acknowledged) >= 200
    return batches


def test_node_and_leader_loss_in_a_three_node_cluster_loses_nothing(
    tmp_path: Path, sink: Sink, cluster: NatsCluster
) -> None:
    _lose_nothing_through_node_leader_and_worker_loss(tmp_path, sink, cluster)


def test_the_same_losses_with_writes_in_atomic_batches_lose_nothing(
    tmp_path: Path, sink: Sink, cluster: NatsCluster
) -> None:
    """Batches from two members and more sessions, so that records, jobs and removals
    do go out in batches while nodes, the leader and workers die under them."""
    batches = _lose_nothing_through_node_leader_and_worker_loss(
        tmp_path, sink, cluster, clients=5, batch_args=["--atomic-batch-min", "2"]
    )
    assert batches["queue"] > 0 and batches["delivery"] > 0, batches


def test_kurrier_up_runs_the_cluster_shape_and_survives_a_node(tmp_path: Path, sink: Sink) -> None:
    config = documents(route("to-sink", ["example.com"], sink.port), trusting("127.0.0.0/8"))
    with UpRelay(tmp_path, config, "--nats-cluster", "3") as relay:
        pids = relay.state["pids"]
        assert isinstance(pids, dict)
        assert {"kurrier-1", "kurrier-2", "kurrier-3", "queue-1", "queue-2"} <= set(pids)
        load = SteadyLoad(relay.smtp_port, "r@example.com", clients=2).start()
        try:
            load.wait_for_acknowledged(30, timeout=120)
            os.kill(relay.pid("kurrier-2"), signal.SIGKILL)  # the supervisor restarts it
            load.wait_for_acknowledged(len(load.ledger.acknowledged) + 30, timeout=120)
        finally:
            ledger = load.stop()
        wait_until(
            lambda: ledger.acknowledged <= {_subject(m.content) for m in sink.messages},
            # A first job that NATS does not take within FIRST_JOBS_WINDOW is the
            # sweeper's: the bound is its (docs/reliability.md).
            SWEPT_WITHIN,
            "every acknowledged message to be delivered",
        )
        wait_until_drained(relay.nats_url, SWEPT_WITHIN)


def test_services_started_without_a_jetstream_quorum_wait_for_it(
    tmp_path: Path, sink: Sink, cluster: NatsCluster
) -> None:
    """A queue or delivery process restarted while its streams elect leaders must not
    exit: with nobody to restart it (a crash-looping pod backs off for minutes),
    ingress would have no queue to reconnect to, and jobs nobody to take them."""
    wait_until(lambda: cluster_layout_error(cluster.url()) is None, 60, "JetStream in the cluster")
    relay = ServiceRelay(
        tmp_path, cluster.url(), service_args={name: REPLICAS for name in ("queue", "delivery")}
    )
    relay.publish(documents(route("to-sink", ["example.com"], sink.port), trusting("127.0.0.0/8")))
    with relay:
        cluster.kill("kurrier-2")
        cluster.kill("kurrier-3")
        for name in ("queue", "delivery"):
            relay.processes[name].kill()
            relay.processes[name].wait()
            relay.start(name, wait=False)

        def waiting_for_jetstream(name: str) -> bool:
            assert relay.processes[name].poll() is None, f"{name} exited"
            log = tmp_path / f"{name}.log"
            return "JetStream does not answer yet" in log.read_text(errors="replace")

        for name in ("queue", "delivery"):
            wait_until(lambda: waiting_for_jetstream(name), 60, f"{name} to wait for JetStream")  # noqa: B023
        cluster.start("kurrier-2")
        cluster.start("kurrier-3")

        def accepted() -> bool:
            """As a client would: 451 while the streams still elect leaders, then 250."""
            with smtplib.SMTP("127.0.0.1", relay.smtp_port) as client:
                try:
                    client.sendmail(
                        "a@client.test", ["r@example.com"], b"Subject: after the quorum\r\n\r\n"
                    )
                except smtplib.SMTPDataError as error:
                    if error.smtp_code != 451:
                        raise
                    return False
            return True

        wait_until(accepted, 120, "the relay to accept mail again")
        assert b"after the quorum" in sink.wait_for(1, timeout=120)[0].content


def test_a_consumer_asked_for_without_a_jetstream_quorum_comes_once_it_returns(
    cluster: NatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The consumers a service creates once, as it starts (delivery's jobs, the queue's
    results and due retries), are asked for again rather than ending the process."""
    wait_until(lambda: cluster_layout_error(cluster.url()) is None, 60, "JetStream in the cluster")
    cluster.kill("kurrier-2")
    cluster.kill("kurrier-3")

    async def scenario() -> str:
        nc = await connect(cluster.url(), "test-consumer")
        try:
            js = nc.jetstream()
            subscribing = asyncio.create_task(
                when_answered(
                    lambda: js.pull_subscribe("kurrier.due.*", "test-consumer", JOBS_STREAM),
                    "a test consumer",
                )
            )
            await eventually(
                lambda: "JetStream does not answer yet (a test consumer)" in caplog.text,
                60,
                "the consumer to be asked for again",
            )
            assert not subscribing.done()
            await asyncio.to_thread(cluster.start, "kurrier-2")
            await asyncio.to_thread(cluster.start, "kurrier-3")
            await asyncio.wait_for(subscribing, 120)
            info = await js.consumer_info(JOBS_STREAM, "test-consumer")
            return str(info.name)
        finally:
            await disconnect(nc)

    caplog.set_level(logging.WARNING, "kurrier.core.jetstream")
    assert asyncio.run(scenario()) == "test-consumer"


def test_a_client_of_a_frozen_node_moves_to_a_live_one(cluster: NatsCluster) -> None:
    """A node that stops answering but keeps its connections open (SIGSTOP here: a
    frozen VM, a disk that hangs every write): a service's connection leaves it for a
    live node, where JetStream answers, within a minute (nats-py's default pings
    kept it there for over six)."""
    wait_until(lambda: cluster_layout_error(cluster.url()) is None, 60, "JetStream in the cluster")

    async def scenario() -> tuple[str, str]:
        nc = await connect(cluster.url(), "test-frozen")
        try:
            first = str(nc.connected_url.netloc if nc.connected_url else "")
            frozen = cluster.nodes[[f"127.0.0.1:{p}" for p in cluster.ports].index(first)].name
            cluster.signal(frozen, signal.SIGSTOP)
            try:
                await eventually(
                    lambda: nc.connected_url is not None and nc.connected_url.netloc != first,
                    60,
                    "the connection to leave the frozen node",
                )
                await when_answered(nc.jetstream().account_info, "the account")
            finally:
                cluster.signal(frozen, signal.SIGCONT)
            return first, str(nc.connected_url.netloc if nc.connected_url else "")
        finally:
            await disconnect(nc)

    first, now = asyncio.run(scenario())
    assert now != first
