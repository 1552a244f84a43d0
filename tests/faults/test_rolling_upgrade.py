"""A rolling upgrade under load: the previous release's services, two of each as a
chart's replicas on one real nats-server, replaced one by one by this
release's in the documented order (docs/deploy.md, Upgrades), while this
release's publisher replaces the previous one's routing table with one of its own;
then back again.

Mail flows at every step, no client hears a 5xx, nothing acknowledged is lost
or bounced, and the queue drains.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench.systems import kurrier_snapshot
from tests.support.checker import check, outcome
from tests.support.load import Ledger, SteadyLoad
from tests.support.nats import NatsServer
from tests.support.processes import wait_until
from tests.support.relay import ServiceRelay, documents, queued_count, route, trusting
from tests.support.sink import Sink

pytestmark = pytest.mark.slow

# The release this one upgrades from (there are no release tags yet); moved on
# with each release, so each upgrade path is tried once.
PREVIOUS_RELEASE = "6657f2e"
ROLL_ORDER = ("delivery", "queue", "ingress")
RECIPIENT = "r@example.com"
# The load's sender domain routes to the sink too, so a bounce would be seen there.
SENDER = "load@client.test"
DOMAINS = ["example.com", "client.test"]

_POLICY_OF_THIS_RELEASE = """\
apiVersion: kurrier.io/v1alpha1
kind: RelayPolicy
metadata: {name: default}
spec: {trustedNetworks: ["127.0.0.0/8"], delayWarningTime: 4h}"""

# The previous release's publisher, as its operator or `kurrier up` runs it.
_PUBLISH = """
import asyncio, sys, yaml
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.core.loader import parse_documents
from kurrier.core.routing import compile_table
from kurrier.core.table_store import publish_table

async def main() -> None:
    table, problems = compile_table(parse_documents(yaml.safe_load_all(sys.stdin), "test"))
    assert not problems, problems
    nc = await connect(sys.argv[1], "previous-publisher")
    await ensure_layout(nc.jetstream())
    await publish_table(nc.jetstream(), table)
    await disconnect(nc)

asyncio.run(main())
"""


def _publish_as(env: dict[str, str], nats_url: str, config: str) -> None:
    subprocess.run(
        [sys.executable, "-c", _PUBLISH, nats_url],
        input=config.encode(),
        env={**os.environ, **env},
        check=True,
        timeout=60,
    )


def _config(sink: Sink, policy: str = trusting("127.0.0.0/8"), priority: int = 100) -> str:
    return documents(route("to-sink", DOMAINS, sink.port, priority=priority), policy)


def _uses_revision(relay: ServiceRelay, name: str, revision: int) -> bool:
    log = (relay.workdir / f"{name}.log").read_text(errors="replace")
    return f"routing table revision {revision} in use" in log


def test_rolling_upgrade_from_the_previous_release_loses_nothing(
    tmp_path: Path, sink: Sink, nats_server: NatsServer
) -> None:
    _, previous = kurrier_snapshot(PREVIOUS_RELEASE, tmp_path / "snapshots")
    _publish_as(previous, nats_server.url, _config(sink))
    relays = []
    for replica in ("a", "b"):
        workdir = tmp_path / replica
        workdir.mkdir()
        relay = ServiceRelay(workdir, nats_server.url, env=previous)
        relay.published = True
        relays.append(relay)
    with contextlib.ExitStack() as running:
        for relay in relays:
            running.enter_context(relay)
        loads = [SteadyLoad(r.smtp_port, RECIPIENT, clients=2).start() for r in relays]
        running.callback(lambda: [load.stop() for load in loads])  # before the relays stop

        def mail_flows(after: str) -> None:
            delivered = len(sink.messages)
            for replica, load in zip("ab", loads, strict=True):
                try:
                    load.wait_for_acknowledged(len(load.ledger.acknowledged) + 15, timeout=60)
                except AssertionError as error:
                    raise AssertionError(
                        f"relay {replica} stalled after {after}: {error}"
                    ) from None
            wait_until(lambda: len(sink.messages) >= delivered + 30, 60, f"delivery after {after}")

        def taken_by_all(config: str, revision: int, what: str) -> None:
            relays[0].publish(config)
            wait_until(
                lambda: all(
                    _uses_revision(r, name, revision) for r in relays for name in ROLL_ORDER
                ),
                30,
                f"every service to take {what}",
            )
            mail_flows(what)

        def roll(order: Sequence[str], env: dict[str, str], what: str) -> None:
            for name in order:
                for replica, relay in zip("ab", relays, strict=True):
                    relay.processes[name].terminate()  # as Kubernetes ends a pod
                    relay.processes[name].wait(timeout=30)
                    relay.start(name, env=env)
                    mail_flows(f"{what} {name} in {replica}")

        mail_flows("the start")
        # This release's operator publishes before any service has rolled.
        taken_by_all(_config(sink, priority=50), 2, "this release's table")
        roll(ROLL_ORDER, {}, "upgrading")
        taken_by_all(
            _config(sink, _POLICY_OF_THIS_RELEASE), 3, "a table with this release's fields"
        )
        # Back: first a table the previous release reads, then the reverse order.
        taken_by_all(_config(sink), 4, "the table without them")
        roll(ROLL_ORDER[::-1], previous, "rolling back")
        ledgers = [load.stop() for load in loads]
        acknowledged = set().union(*(ledger.acknowledged for ledger in ledgers))
        wait_until(
            lambda: acknowledged <= _arrived(sink, ledgers),
            120,
            "every acknowledged message to reach the sink",
        )
        wait_until(lambda: queued_count(nats_server.url) == 0, 60, "the queue to drain")
    for ledger in ledgers:
        report = check(ledger, outcome(sink.messages, RECIPIENT, SENDER, ledger.attempted))
        assert not report.lost and not report.bounced, report.lines()
        assert not ledger.refused_for_good, sorted(ledger.refused_for_good)[:10]
    assert len(acknowledged) >= 200


def _arrived(sink: Sink, ledgers: list[Ledger]) -> set[str]:
    markers = set().union(*(ledger.attempted for ledger in ledgers))
    result = outcome(sink.messages, RECIPIENT, SENDER, markers)
    return set(result.delivered | result.bounced)
