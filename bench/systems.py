"""kurrier and Postfix under test, each started fresh in its own directory and stopped after a cell.

Each relay (and Haraka, bench/haraka.py) listens on a loopback port, trusts
127.0.0.0/8, relays everything to the bench sink with TLS off, at most 20
connections to it (Postfix's default_destination_concurrency_limit), and
says in `durability` what its 250 survives as configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kurrier.cli.nats_server import default_sync_interval
from kurrier.core.smtp_probe import wait_for_smtp_banner

from bench import proc
from bench.experiments.sitecustomize import KNOWN as KNOWN_EXPERIMENTS
from bench.interpreter import INTERPRETERS, REPO

DESTINATION_CONCURRENCY = 20
# How long a relay may take to drain and exit after SIGTERM before it is killed.
STOP_TIMEOUT = 20.0


class System(Protocol):
    name: str
    durability: str  # what a 250 survives, as configured
    smtp_port: int
    stop_seconds: float
    stopped_cleanly: bool

    @property
    def root_pid(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_or_kill(process: asyncio.subprocess.Process, timeout: float) -> tuple[float, bool]:
    """(seconds, exited in time): wait for process; SIGKILL its whole tree after timeout."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(process.wait(), timeout=timeout)
    except TimeoutError:
        for info in proc.tree(process.pid, with_memory=False):
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.pid, signal.SIGKILL)
        await process.wait()
        return time.monotonic() - started, False
    return time.monotonic() - started, True


KURRIER_CONFIG = """\
apiVersion: kurrier.io/v1alpha1
kind: RelayDomain
metadata: {{name: example-com}}
spec:
  domain: example.com
  acceptInbound: true
---
apiVersion: kurrier.io/v1alpha1
kind: RelayRoute
metadata: {{name: to-bench-sink}}
spec:
  priority: 100
  match:
    recipientDomains: ["*"]
  destination:
    smarthost: {{host: 127.0.0.1, port: {sink_port}}}
  tls: {{mode: none}}
  maxConnections: {connections}
---
apiVersion: kurrier.io/v1alpha1
kind: RelayPolicy
metadata: {{name: default}}
spec:
  trustedNetworks: ["127.0.0.0/8"]
  # 127.0.0.0/8 is trusted and so exempt; set for @REV revisions without that exemption.
  maxConnectionsPerClient: 1000
  maxMessageSize: 26214400
  maxRecipients: 100
"""


def kurrier_command(python: str) -> list[str]:
    return [python, "-m", "kurrier.cli"]


def kurrier_snapshot(revision: str, cache: Path) -> tuple[str, dict[str, str]]:
    """(commit, environment) to run kurrier's code as committed at `revision`.

    The work tree may be mid-edit (several people work in it at once); a
    benchmark should measure committed code, which `git archive` extracts into
    the cache. PYTHONPATH puts it ahead of the editable install, and `kurrier
    up` passes its environment on to its services. "working" means the work
    tree as it is, through the installed package.
    """
    if revision == "working":
        return "working tree", {}
    found = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=12", f"{revision}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    commit = found.stdout.strip()
    source = cache / f"src-{commit}"
    if not (source / "services" / "kurrier").is_dir():
        partial = cache / f"src-{commit}.part"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "services", "operator"],
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive.stdout, check=True)
        shutil.rmtree(source, ignore_errors=True)
        partial.rename(source)
    paths = [str(source / "services"), str(source / "operator")]
    return commit, {"PYTHONPATH": os.pathsep.join(paths)}


EXPERIMENTS = Path(__file__).resolve().parent / "experiments"


def experiment_env(base: dict[str, str], experiments: list[str]) -> dict[str, str]:
    """base, plus what makes kurrier's processes apply bench/experiments/<names>."""
    if not experiments:
        return dict(base)
    unknown = set(experiments) - KNOWN_EXPERIMENTS
    if unknown:
        raise ValueError(
            f"unknown experiment(s) {sorted(unknown)}; known: {sorted(KNOWN_EXPERIMENTS)}"
        )
    path = base.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    return {
        **base,
        "PYTHONPATH": os.pathsep.join(p for p in (str(EXPERIMENTS), path) if p),
        "KURRIER_BENCH_EXPERIMENTS": ",".join(experiments),
    }


@dataclass(frozen=True)
class KurrierVariant:
    """A kurrier system name:
    `kurrier[@REV][+EXPERIMENT...][/cluster=N][/sync=INTERVAL][/batch=N][/python=NAME]`."""

    revision: str | None  # None: the run's --kurrier-rev
    experiments: list[str]
    nodes: int
    sync: str | None  # None: `kurrier up`'s default for the nodes
    batch: str | None = None  # --atomic-batch-min; None: `kurrier up`'s default
    python: str | None = None  # bench/interpreter.py's choice; None: the run's --kurrier-python

    @classmethod
    def parse(cls, name: str) -> KurrierVariant:
        base, *options = name.split("/")
        code, *experiments = base.split("+")
        _, at, revision = code.partition("@")
        found: dict[str, str] = {}
        for option in options:
            key, equals, value = option.partition("=")
            if key not in ("cluster", "sync", "batch", "python") or not equals or key in found:
                raise ValueError(
                    f"{name!r}: options are /cluster=N, /sync=INTERVAL, /batch=N and /python=NAME"
                )
            found[key] = value
        if found.get("python", INTERPRETERS[0]) not in INTERPRETERS:
            raise ValueError(f"{name!r}: /python= is one of {', '.join(INTERPRETERS)}")
        return cls(
            revision if at else None,
            experiments,
            int(found.get("cluster", 1)),
            found.get("sync"),
            found.get("batch"),
            found.get("python"),
        )

    def up_args(self) -> list[str]:
        args = ["--nats-cluster", str(self.nodes)] if self.nodes > 1 else []
        args += ["--atomic-batch-min", self.batch] if self.batch else []
        return args + (["--nats-sync", self.sync] if self.sync else [])

    @property
    def durability(self) -> str:
        """What a 250 survives with `kurrier up`'s JetStream as this variant runs it."""
        if self.revision is not None and self.sync is None:
            return f"{self.revision}'s default"  # its defaults may differ from this code's
        synced = (self.sync or default_sync_interval(self.nodes)) == "always"
        if self.nodes == 1:
            return (
                "power cut (fsync before 250)" if synced else f"page cache only (sync {self.sync})"
            )
        quorum = f"one node lost (R3 quorum of {self.nodes}"
        return quorum + (", fsync)" if synced else f", page cache; sync {self.sync or '2m'})")


class PeerProcess:
    """What each system under test does alike: one root process (its whole tree is
    measured), started from an argv into a log and ready once its SMTP port
    greets, stopped each its own way (`stop`)."""

    def __init__(self, workdir: Path, sink_port: int) -> None:
        self.workdir = workdir
        self.sink_port = sink_port
        self.smtp_port = free_port()
        self.stop_seconds = 0.0
        self.stopped_cleanly = True
        self._process: asyncio.subprocess.Process | None = None

    @property
    def root_pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def _launch(
        self,
        argv: list[str],
        log_name: str,
        ready: Callable[[], Awaitable[None]] | None = None,
        **options: Any,
    ) -> None:
        """Start argv (options go to create_subprocess_exec), then wait until ready:
        the SMTP banner unless told otherwise. A start that fails is stopped."""
        with (self.workdir / log_name).open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                *argv, stdout=log, stderr=subprocess.STDOUT, **options
            )
        try:
            if ready is None:
                await wait_for_smtp_banner("127.0.0.1", self.smtp_port, 60)
            else:
                await ready()
        except BaseException:
            await self.stop()
            raise

    def _running(self) -> asyncio.subprocess.Process | None:
        process = self._process
        return None if process is None or process.returncode is not None else process

    async def _signal_and_wait(self, number: int) -> None:
        """Stop by a signal: clean if it exited 0 within STOP_TIMEOUT (else killed)."""
        process = self._running()
        if process is None:
            return
        process.send_signal(number)
        self.stop_seconds, in_time = await wait_or_kill(process, STOP_TIMEOUT)
        self.stopped_cleanly = in_time and process.returncode == 0

    async def stop(self) -> None:
        raise NotImplementedError


class Kurrier(PeerProcess):
    """`kurrier up` with a fresh data directory."""

    def __init__(
        self,
        workdir: Path,
        sink_port: int,
        env: dict[str, str] | None = None,
        variant: KurrierVariant | None = None,
        name: str = "kurrier",
        python: str = sys.executable,
    ) -> None:
        super().__init__(workdir, sink_port)
        self.name = name
        self.python = python
        self.env = env or {}
        self.variant = variant or KurrierVariant(None, [], 1, None)
        self.durability = self.variant.durability

    async def start(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        config = self.workdir / "bench.yaml"
        config.write_text(
            KURRIER_CONFIG.format(sink_port=self.sink_port, connections=DESTINATION_CONCURRENCY)
        )
        await self._launch(
            [
                *kurrier_command(self.python),
                "up",
                "--config",
                str(config),
                "--data-dir",
                str(self.workdir / "data"),
                "--smtp",
                f"127.0.0.1:{self.smtp_port}",
                "--hostname",
                "kurrier-bench.localdomain",
                "--min-backoff",
                "1s",
                "--max-backoff",
                "5s",
                *self.variant.up_args(),
            ],
            "kurrier.log",
            ready=lambda: self._wait_ready(90),
            cwd=self.workdir,
            env={**os.environ, **self.env},
        )

    async def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        log = self.workdir / "kurrier.log"
        while b"kurrier ready" not in log.read_bytes():
            assert self._process is not None
            if self._process.returncode is not None:
                raise RuntimeError(f"kurrier up exited early; see {log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"kurrier up not ready after {timeout}s; see {log}")
            await asyncio.sleep(0.1)
        await wait_for_smtp_banner("127.0.0.1", self.smtp_port, timeout)

    async def stop(self) -> None:
        """SIGTERM (a drain), then SIGKILL to the whole tree after STOP_TIMEOUT.

        The data directory is thrown away after each cell, so a forced stop loses
        nothing the benchmark counts; how long the drain took is recorded.
        """
        await self._signal_and_wait(signal.SIGTERM)


POSTFIX_MAIN_CF = """\
# Written by bench/systems.py: a loopback relay for the benchmark, nothing else.
compatibility_level = 3.6
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.localdomain
mydomain = localdomain
mydestination =
local_transport = error:no local delivery here
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{sink_port}
default_destination_concurrency_limit = {connections}
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtp_tls_security_level = none
smtpd_tls_security_level = none
message_size_limit = 26214400
maillog_file = {root}/log/postfix.log
biff = no
"""

# Debian's master.cf without chroot (the private queue directory has no chroot jail)
# and with smtpd on the bench port.
POSTFIX_MASTER_CF = """\
127.0.0.1:{smtp_port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_version() -> str | None:
    if shutil.which("postconf") is None:
        return None
    found = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
    )
    return found.stdout.strip() or None


def install_postfix() -> str:
    """Postfix from Debian's packages, without it configuring or starting a system instance."""
    version = postfix_version()
    if version:
        return version
    if os.geteuid() != 0:
        raise RuntimeError("Postfix is not installed and installing it needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("installing Postfix from Debian's packages ...", flush=True)
    subprocess.run(
        ["debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n",
        check=True,
        env=env,
    )
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postfix"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    version = postfix_version()
    if not version:
        raise RuntimeError("Postfix did not install")
    return version


class Postfix(PeerProcess):
    """A private Postfix instance (`postfix -c DIR start-fg`) in its own directory."""

    name = "postfix"
    durability = "power cut (fsync before 250)"

    def __init__(
        self, workdir: Path, sink_port: int, settings: dict[str, str] | None = None
    ) -> None:
        super().__init__(workdir, sink_port)
        # main.cf parameters over the benchmark's (tests make Postfix an older next hop).
        self.settings = settings or {}

    @property
    def config_dir(self) -> Path:
        return self.workdir / "etc"

    def _write_config(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        for sub in ("etc", "spool", "data", "log"):
            (self.workdir / sub).mkdir(parents=True)
        shutil.chown(self.workdir / "data", "postfix", "postfix")
        root = str(self.workdir)
        (self.config_dir / "main.cf").write_text(
            POSTFIX_MAIN_CF.format(
                root=root, sink_port=self.sink_port, connections=DESTINATION_CONCURRENCY
            )
            + "".join(f"{name} = {value}\n" for name, value in self.settings.items())
        )
        (self.config_dir / "master.cf").write_text(
            POSTFIX_MASTER_CF.format(smtp_port=self.smtp_port)
        )

    async def _postfix(self, command: str) -> int:
        process = await asyncio.create_subprocess_exec(
            "postfix",
            "-c",
            str(self.config_dir),
            command,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await process.wait()

    async def start(self) -> None:
        self._write_config()
        if await self._postfix("check") != 0:
            raise RuntimeError(f"postfix -c {self.config_dir} check failed")
        # start-fg keeps master in the foreground as our descendant: its whole
        # process tree (master and every daemon it spawns) is measurable.
        await self._launch(["postfix", "-c", str(self.config_dir), "start-fg"], "start.log")

    async def stop(self) -> None:
        process = self._running()
        if process is None:
            return
        await self._postfix("stop")
        # start-fg exits non-zero once master is told to stop: only the time counts.
        self.stop_seconds, self.stopped_cleanly = await wait_or_kill(process, STOP_TIMEOUT)
