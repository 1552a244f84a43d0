"""A nemesis for kurrier on test hosts: faults in a seeded random order, under SMTP load.

The faults, each healed before the next:

- partition: one NATS node's host drops what it sends to the other two NATS
  hosts and they drop what they send to it (blackhole routes in each
  namespace); clients and services still reach it, it no longer reaches its
  peers.
- isolate-leader: the host of KURRIER_JOBS's leader loses its link (its
  veth down): nothing reaches it or leaves it, also the services beside it.
- one-way: the host of KURRIER_JOBS's leader receives nothing from the
  other NATS hosts, which still receive what it sends (iptables in its
  namespace): a leader whose heartbeats arrive but which hears no answer.
- cut-queue-path: one ingress's host and the queue it uses first drop the
  gRPC connection between them, both ways (iptables, that port only: the
  NATS nodes on the same hosts still talk), for longer than a message's
  Enqueue deadline, so the messages sent then end in that deadline.
- slow-link: one NATS host's link becomes slow and lossy: what it sends held
  to 2 Mbit/s (tc tbf, queued up to 200 ms), 5 % of what it receives
  dropped at random (iptables); tc netem's fixed delay needs a kernel module
  this machine lacks.
- pause: SIGSTOP of a queue or delivery process for longer than the jobs'
  ack wait and the sweeper's lease, then SIGCONT (a long GC, a frozen VM).
- freeze-node: SIGSTOP of a NATS node for 20-30 s, then SIGCONT: a frozen VM
  or a disk hanging every write; its connections stay open and go silent.
- kill-node: SIGKILL of a NATS node, restarted on its store.
- wipe-node: SIGKILL of a NATS node, restarted on an empty store (a pod
  replaced with a new volume); it catches up from its peers.

After each heal the load on each ingress must make progress again. At the end the load stops,
the cluster settles, and the checker compares what the client was told with
what reached the next hop. The seed is printed first; the same seed picks the
same faults, targets and durations (the timing of the load is not replayed).

A long run, as root on a machine with iproute2:

    .venv/bin/python -m tests.support.nemesis --minutes 30 --seed 7
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kurrier.core.jetstream import LEASE_TTL
from kurrier.delivery.worker import ACK_WAIT
from kurrier.ingress.queue_client import ENQUEUE_TIMEOUT

from tests.support.checker import Report, check, combined, outcome
from tests.support.fleet import (
    INGRESSES,
    NATS_HOSTS,
    QUEUE_PORT,
    QUEUES_OF,
    RECIPIENT,
    SENDER_DOMAIN,
    Fleet,
    nats_name,
    running_fleet,
)
from tests.support.load import SteadyLoad
from tests.support.nats import stream_leader
from tests.support.processes import wait_until
from tests.support.relay import queued_count, stored_bodies

# Longer than a delivery job's ack wait and the sweeper's lease: both move to another process.
PAUSE = max(ACK_WAIT, LEASE_TTL) + 5
SLOW_RATE = "2mbit"
LOSS = 0.05
PAUSED = ("queue-1", "queue-2", "delivery-1", "delivery-2")
FAULTS = (
    "partition",
    "isolate-leader",
    "one-way",
    "cut-queue-path",
    "slow-link",
    "pause",
    "freeze-node",
    "kill-node",
    "wipe-node",
)
SENDER = f"load@{SENDER_DOMAIN}"


class Nemesis:
    def __init__(
        self,
        fleet: Fleet,
        loads: dict[str, SteadyLoad],
        rng: random.Random,
        say: Callable[[str], None],
    ):
        self.fleet = fleet
        self.loads = loads
        self.rng = rng
        self.say = say
        self.counts: Counter[str] = Counter()
        self.began = time.monotonic()

    def _hold(self, low: float, high: float) -> None:
        # The fault's duration, drawn from the seed: a deliberate wait, not a synchronisation.
        time.sleep(self.rng.uniform(low, high))

    def run(self, fault: str) -> None:
        started = time.monotonic()
        target = {
            "partition": self.partition,
            "isolate-leader": self.isolate_leader,
            "one-way": self.one_way,
            "cut-queue-path": self.cut_queue_path,
            "slow-link": self.slow_link,
            "pause": self.pause,
            "freeze-node": self.freeze_node,
            "kill-node": self.kill_node,
            "wipe-node": self.wipe_node,
        }[fault]()
        self.counts[fault] += 1
        self.say(f"{self.clock()} {fault} {target}: healed after {time.monotonic() - started:.1f}s")
        self._progress(f"{fault} {target}")

    def clock(self) -> str:
        return f"{time.monotonic() - self.began:6.1f}s"

    def _progress(self, after: str) -> None:
        for ingress, load in self.loads.items():
            try:
                load.wait_for_acknowledged(len(load.ledger.acknowledged) + 10, timeout=180)
            except AssertionError as error:
                raise AssertionError(f"no progress on {ingress} after {after}: {error}") from None

    def partition(self) -> str:
        cut = self.fleet.hosts[self.rng.choice(NATS_HOSTS)]
        others = [self.fleet.hosts[name] for name in NATS_HOSTS if name != cut.name]
        for other in others:
            cut.drop_to(other)
            other.drop_to(cut)
        try:
            self._hold(5, 12)
        finally:
            for other in others:
                cut.restore_to(other)
                other.restore_to(cut)
        return cut.name

    def _leader_host(self) -> str:
        return stream_leader(self.fleet.control_url, timeout=120).removeprefix("nats-")

    def isolate_leader(self) -> str:
        host = self.fleet.hosts[self._leader_host()]
        host.set_link(False)
        try:
            self._hold(5, 12)
        finally:
            host.set_link(True)
        return host.name

    def one_way(self) -> str:
        deaf = self.fleet.hosts[self._leader_host()]
        peers = [self.fleet.hosts[name] for name in NATS_HOSTS if name != deaf.name]
        for peer in peers:
            deaf.drop_from(peer)
        try:
            self._hold(5, 12)
        finally:
            for peer in peers:
                deaf.restore_from(peer)
        return f"{deaf.name} (deaf to its peers)"

    def cut_queue_path(self) -> str:
        ingress = self.rng.choice(INGRESSES)
        queue = QUEUES_OF[ingress][0]
        near, far = self.fleet.host_of(ingress), self.fleet.host_of(queue)
        near.drop_port_to(far, QUEUE_PORT)
        try:
            self._hold(ENQUEUE_TIMEOUT + 2, ENQUEUE_TIMEOUT + 8)
        finally:
            near.restore_port_to(far, QUEUE_PORT)
        return f"{ingress} -> {queue}"

    def slow_link(self) -> str:
        host = self.fleet.hosts[self.rng.choice(NATS_HOSTS)]
        host.degrade(SLOW_RATE, LOSS)
        try:
            self._hold(10, 20)
        finally:
            host.restore_quality(LOSS)
        return f"{host.name} ({SLOW_RATE}, {LOSS:.0%} of what it receives lost)"

    def pause(self) -> str:
        name = self.rng.choice(PAUSED)
        self.fleet.signal(name, signal.SIGSTOP)
        try:
            self._hold(PAUSE, PAUSE + 5)
        finally:
            self.fleet.signal(name, signal.SIGCONT)
        return name

    def freeze_node(self) -> str:
        name = nats_name(self.rng.choice(NATS_HOSTS))
        self.fleet.signal(name, signal.SIGSTOP)
        try:
            self._hold(20, 30)
        finally:
            self.fleet.signal(name, signal.SIGCONT)
        return name

    def kill_node(self, wipe: bool = False) -> str:
        host = self.rng.choice(NATS_HOSTS)
        self.fleet.kill(nats_name(host))
        if wipe:
            shutil.rmtree(self.fleet.store(host))
        self._hold(1, 5)
        self.fleet.start_nats(host)
        return nats_name(host)

    def wipe_node(self) -> str:
        return self.kill_node(wipe=True)


@dataclass(frozen=True)
class Verdict:
    report: Report
    faults: Counter[str]
    acknowledged_by: dict[str, int]  # ingress -> what its load saw acknowledged
    queue_left: int  # records; -1 when NATS did not answer
    bodies_left: int

    def lines(self) -> list[str]:
        faults = ", ".join(f"{name} {count}" for name, count in sorted(self.faults.items()))
        ingresses = ", ".join(f"{name} {count}" for name, count in self.acknowledged_by.items())
        return [
            f"faults: {faults}",
            f"acknowledged by ingress: {ingresses}",
            *self.report.lines(),
            f"left in the queue {self.queue_left}, in the bodies stream {self.bodies_left}",
        ]

    @property
    def passed(self) -> bool:
        return (
            not self.report.lost
            and not self.report.phantoms
            and self.queue_left == 0
            and self.bodies_left == 0
        )


def _settle(fleet: Fleet, loads: dict[str, SteadyLoad], timeout: float) -> tuple[Report, int, int]:
    """Stop the loads, wait for the acknowledged to arrive and the store to empty; the report."""
    ledger = combined([load.stop() for load in loads.values()])
    sink = fleet.sink
    assert sink is not None

    def report() -> Report:
        return check(ledger, outcome(list(sink.messages), RECIPIENT, SENDER, ledger.attempted))

    def left() -> tuple[int, int]:
        return queued_count(fleet.control_url), stored_bodies(fleet.control_url)

    with contextlib.suppress(AssertionError):  # the verdict says what is missing
        wait_until(
            lambda: not report().lost and left() == (0, 0),
            timeout,
            "the acknowledged to arrive and the queue to empty",
        )
    return report(), *left()


def run(
    fleet: Fleet,
    seed: int,
    faults: int | None = None,
    minutes: float | None = None,
    say: Callable[[str], None] = print,
    settle_timeout: float = 300,
) -> Verdict:
    """`faults` rounds of every fault in a seeded order, or random faults for `minutes`."""
    rng = random.Random(seed)
    loads = fleet.start_loads()
    nemesis = Nemesis(fleet, loads, rng, say)
    nemesis._progress("start")
    if minutes is not None:
        deadline = time.monotonic() + minutes * 60
        while time.monotonic() < deadline:
            nemesis.run(rng.choice(FAULTS))
    for _ in range(faults or 0):
        for fault in rng.sample(FAULTS, len(FAULTS)):
            nemesis.run(fault)
    report, queue_left, bodies_left = _settle(fleet, loads, settle_timeout)
    say(f"{nemesis.clock()} settled")
    acknowledged_by = {name: len(load.ledger.acknowledged) for name, load in loads.items()}
    return Verdict(report, nemesis.counts, acknowledged_by, queue_left, bodies_left)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="logs (default: a temp dir)")
    args = parser.parse_args(argv)
    seed = random.randrange(2**32) if args.seed is None else args.seed
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kurrier-nemesis-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"nemesis seed {seed}, logs in {workdir}", flush=True)

    def say(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    with running_fleet(workdir) as fleet:
        verdict = run(fleet, seed, minutes=args.minutes, say=say)
    print("\n".join([f"seed {seed}", *verdict.lines()]), flush=True)
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
