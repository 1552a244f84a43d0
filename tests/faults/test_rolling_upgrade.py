"""A rolling upgrade under load, on test hosts with their own addresses.

The previous release's services run as the chart spreads them (the nemesis's
fleet: three NATS nodes, two ingress, queue and delivery processes, each host
with its own address). They are replaced one by one by this release's in the
documented order (docs/deploy.md, Upgrades), as Kubernetes replaces a pod
(SIGTERM, at most 30 s to finish, then a new process); the NATS nodes are
then restarted one by one on their stores, as the StatefulSet rolls; this
release's publisher meanwhile replaces the previous one's routing table with
one of its own. Then back again: first this release's queues with bodies kept
out of records (the setting for a roll back below wire version 6) until what
was accepted before has been delivered, then the reverse order.

Mail flows after every step; no client hears a 5xx, and a 4xx only within
TEMPORARY_WINDOW of a pod being told to stop; nothing acknowledged is lost or
bounced, and the queue drains.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest

from bench.systems import kurrier_snapshot
from tests.support.checker import check, combined, outcome
from tests.support.fleet import (
    HOSTS,
    NATS_HOSTS,
    PREVIOUS_RELEASE,
    RECIPIENT,
    SENDER_DOMAIN,
    SERVICES,
    SMTP_PORT,
    Fleet,
)
from tests.support.netns import TestNetwork
from tests.support.processes import wait_until
from tests.support.relay import (
    SWEPT_WITHIN,
    documents,
    publish_config,
    route,
    trusting,
    wait_until_drained,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROLL_ORDER = ("delivery", "queue", "ingress")
SENDER = f"load@{SENDER_DOMAIN}"
# docs/deploy.md (Upgrades): how long after a pod is told to stop its clients may
# hear 4xx (an ingress's 421 while it drains, a 451 while a queue's connection
# moves to the other queue or a stream elects a new leader).
TEMPORARY_WINDOW = 30.0

_POLICY_OF_THIS_RELEASE = """\
apiVersion: kurrier.io/v1alpha1
kind: RelayPolicy
metadata: {name: default}
spec: {trustedNetworks: ["%s"], delayWarningTime: 4h}"""

# The previous release's publisher, as its operator or `kurrier up` runs it; the
# layout (R3) is already there.
_PUBLISH = """
import asyncio, sys, yaml
from kurrier.core.jetstream import connect, disconnect
from kurrier.core.loader import parse_documents
from kurrier.core.routing import compile_table
from kurrier.core.table_store import publish_table

async def main() -> None:
    table, problems = compile_table(parse_documents(yaml.safe_load_all(sys.stdin), "test"))
    assert not problems, problems
    nc = await connect(sys.argv[1], "previous-publisher")
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


def _config(fleet: Fleet, priority: int = 100, policy: str | None = None) -> str:
    sink = fleet.hosts["sink"].address
    domains = [RECIPIENT.split("@")[1], SENDER_DOMAIN]
    return documents(
        route("to-sink", domains, SMTP_PORT, host=sink, priority=priority),
        policy or trusting(fleet.network.network),
    )


def _uses_revision(fleet: Fleet, name: str, revision: int) -> bool:
    log = (fleet.workdir / f"{name}.log").read_text(errors="replace")
    return f"routing table revision {revision} in use" in log


def _replicas(service: str) -> list[str]:
    return [name for name in SERVICES if name.split("-")[0] == service]


def test_rolling_upgrade_from_the_previous_release_loses_nothing(tmp_path: Path) -> None:
    _, previous = kurrier_snapshot(PREVIOUS_RELEASE, tmp_path / "snapshots")
    workdir = tmp_path / "fleet"
    workdir.mkdir()
    stopped: list[float] = []  # when each pod was told to stop
    with (
        TestNetwork(HOSTS) as network,
        Fleet(network, workdir, env=previous, publish=partial(_publish_as, previous)) as fleet,
    ):
        sink = fleet.sink
        assert sink is not None
        loads = fleet.start_loads(clients=2)

        def mail_flows(after: str) -> None:
            delivered = len(sink.messages)
            for ingress, load in loads.items():
                try:
                    load.wait_for_acknowledged(len(load.ledger.acknowledged) + 15, timeout=90)
                except AssertionError as error:
                    raise AssertionError(f"{ingress} stalled after {after}: {error}") from None
            wait_until(lambda: len(sink.messages) >= delivered + 30, 90, f"delivery after {after}")

        def delivered_so_far() -> set[str]:
            return set(outcome(list(sink.messages), RECIPIENT, SENDER, set()).delivered)

        def taken_by_all(config: str, revision: int, what: str) -> None:
            publish_config(fleet.control_url, config)
            wait_until(
                lambda: all(_uses_revision(fleet, name, revision) for name in SERVICES),
                60,
                f"every service to take {what}",
            )
            mail_flows(what)

        def roll(order: Sequence[str], env: dict[str, str], what: str) -> None:
            for service in order:
                for name in _replicas(service):
                    stopped.append(time.monotonic())
                    fleet.replace(name, env)
                    mail_flows(f"{what} {name}")

        mail_flows("the start")
        # This release's operator publishes before any service has rolled.
        taken_by_all(_config(fleet, priority=50), 2, "this release's table")
        roll(ROLL_ORDER, {}, "upgrading")
        for host in reversed(NATS_HOSTS):  # the StatefulSet's order: the highest ordinal first
            stopped.append(time.monotonic())
            fleet.restart_nats(host)
            mail_flows(f"restarting nats-{host}")
        new_fields = _POLICY_OF_THIS_RELEASE % fleet.network.network
        taken_by_all(_config(fleet, policy=new_fields), 3, "a table with this release's fields")
        # Back: first a table the previous release reads, then the reverse order.
        taken_by_all(_config(fleet), 4, "the table without them")
        # And queues that keep no body in a record (docs/deploy.md, wire version 6),
        # until what they accepted before has left the queue.
        roll(("queue",), {"KURRIER_BODIES_IN_RECORDS": "off"}, "keeping bodies out of records")
        accepted = set().union(*(load.acknowledged() for load in loads.values()))
        wait_until(
            lambda: accepted <= delivered_so_far(),
            180,
            "what the queue accepted with bodies in records to reach the sink",
        )
        roll(ROLL_ORDER[::-1], previous, "rolling back")

        ledger = combined(load.stop() for load in loads.values())
        markers = ledger.attempted

        def arrived() -> set[str]:
            result = outcome(list(sink.messages), RECIPIENT, SENDER, markers)
            return set(result.delivered | result.bounced)

        wait_until(
            lambda: ledger.acknowledged <= arrived(),
            180,
            "every acknowledged message to reach the sink",
        )
        wait_until_drained(fleet.control_url, SWEPT_WITHIN)
        report = check(ledger, outcome(list(sink.messages), RECIPIENT, SENDER, markers))

    assert not report.lost and not report.bounced and not report.phantoms, report.lines()
    assert len(ledger.acknowledged) >= 400, report.lines()
    assert not ledger.refused_for_good, sorted(ledger.refused_for_good)[:10]
    assert all(code < 500 for _, code in ledger.replies), sorted(ledger.replies)[:10]
    since = _since_a_stop(ledger.replies, stopped)
    late = [(code, round(seconds, 1)) for (_, code), seconds in since if seconds > TEMPORARY_WINDOW]
    assert not late, f"4xx later than {TEMPORARY_WINDOW} s after a pod was told to stop: {late}"
    longest = max((seconds for _, seconds in since), default=0.0)
    codes = Counter(code for _, code in ledger.replies)
    print(f"4xx replies {dict(codes)}, the latest {longest:.1f} s after a pod was told to stop")


def _since_a_stop(
    replies: list[tuple[float, int]], stopped: list[float]
) -> list[tuple[tuple[float, int], float]]:
    """Each reply, with the time since the last pod told to stop before it (inf: none)."""
    return [
        ((heard, code), heard - max((s for s in stopped if s <= heard), default=-float("inf")))
        for heard, code in replies
    ]
