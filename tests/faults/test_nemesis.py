"""kurrier on five test hosts with their own addresses (network namespaces), two
ingress processes under load, under a seeded nemesis: a NATS node partitioned from
its peers, the stream leader's host cut off, the stream leader deaf to its peers
while they still hear it, an ingress's gRPC path to its queue cut, a NATS host's
link slow and lossy, a queue or delivery process paused past its leases, a NATS
node frozen (SIGSTOP: its connections open and silent), a NATS node killed and
restarted on its store, and one on an empty store. Nothing either client saw
acknowledged may be lost."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.support.fleet import running_fleet
from tests.support.nemesis import run

# As test_faults.py: a message sent whose result JetStream could not store (a stream
# electing its leader) is sent again, every 5 s until the result is stored.
DUPLICATES_SHARE = 0.10


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_seeded_nemesis_loses_nothing_acknowledged(tmp_path: Path) -> None:
    seed = int(os.environ.get("KURRIER_NEMESIS_SEED") or random.randrange(2**32))
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)  # live with -n 0 -s; in the failure message in any case
        lines.append(line)

    say(f"nemesis seed {seed} (replay: KURRIER_NEMESIS_SEED={seed})")
    with running_fleet(tmp_path) as fleet:
        verdict = run(fleet, seed, faults=1, say=say)
    summary = "\n".join([*lines, *verdict.lines(), f"logs in {tmp_path}"])
    print(summary)
    assert verdict.passed, summary
    assert verdict.report.acknowledged >= 100, summary
    assert min(verdict.acknowledged_by.values()) >= 50, summary
    assert verdict.report.extra_copies <= DUPLICATES_SHARE * verdict.report.acknowledged, summary
