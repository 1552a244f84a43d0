"""Running kurrier for tests: the whole `kurrier up`, or the services one by one."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import nats.errors
import nats.js.errors
import yaml
from kurrier.cli.up import NATS_USERS_DIR
from kurrier.core.jetstream import (
    BODIES_STREAM,
    DISPATCH_STREAM,
    connect,
    disconnect,
    ensure_layout,
)
from kurrier.core.loader import parse_documents
from kurrier.core.message import MessageRecord
from kurrier.core.records import RecordStore
from kurrier.core.routing import compile_table
from kurrier.core.table_store import publish_table
from kurrier.queue.sweeper import DISPATCH_GRACE, SWEEP_INTERVAL

from tests.support.processes import (
    free_port,
    kurrier_argv,
    port_open,
    smtp_banner,
    stop_process,
    wait_until,
)

FAST_RETRIES = ("--min-backoff", "1s", "--max-backoff", "2s")

# How long a record a crash left without its job may wait for the sweeper:
# DISPATCH_GRACE, then the sweeper's next round, under a lease a killed queue
# process may have held. A queue process or NATS node killed during an Enqueue
# leaves one when the record was stored but neither its job nor its take-back
# was (the client heard 451).
SWEPT_WITHIN = DISPATCH_GRACE + 3 * SWEEP_INTERVAL


def route(
    name: str,
    domains: list[str],
    port: int,
    priority: int = 100,
    tls: str = "none",
    host: str = "127.0.0.1",
    **extra: str,
) -> str:
    destination = f"{{smarthost: {{host: {host}, port: {port}}}}}"
    return _route(name, domains, destination, priority, tls, extra)


def mx_route(
    name: str, domains: list[str], priority: int = 100, tls: str = "opportunistic", **extra: str
) -> str:
    """A route that delivers by DNS MX lookup (`destination: {mx: {}}`)."""
    return _route(name, domains, "{mx: {}}", priority, tls, extra)


def _route(
    name: str, domains: list[str], destination: str, priority: int, tls: str, extra: dict[str, str]
) -> str:
    options = "".join(f"\n  {key}: {value}" for key, value in extra.items())
    return (
        textwrap.dedent(f"""\
        apiVersion: kurrier.io/v1alpha1
        kind: RelayRoute
        metadata: {{name: {name}}}
        spec:
          priority: {priority}
          match: {{recipientDomains: {json.dumps(domains)}}}
          destination: {destination}
          tls: {{mode: {tls}}}""")
        + options
    )


def secret(name: str, **string_data: str) -> str:
    """A v1 Secret; values go in stringData (a basic-auth pair, a PEM key...)."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "stringData": string_data,
        }
    ).rstrip()


def signing_domain(domain: str, selector: str, secret_name: str, key: str = "private.pem") -> str:
    """A RelayDomain whose outgoing mail is DKIM-signed with the key in secret_name."""
    return textwrap.dedent(f"""\
        apiVersion: kurrier.io/v1alpha1
        kind: RelayDomain
        metadata: {{name: {domain.replace(".", "-")}}}
        spec:
          domain: {domain}
          dkim: {{selector: {selector}, secretRef: {{name: {secret_name}, key: {key}}}}}""")


def multi_key_domain(domain: str, secret_name: str, keys: dict[str, str]) -> str:
    """A RelayDomain signing with several keys of secret_name: selector -> the Secret's key."""
    listed = ", ".join(
        f"{{selector: {selector}, secretRef: {{name: {secret_name}, key: {key}}}}}"
        for selector, key in keys.items()
    )
    return textwrap.dedent(f"""\
        apiVersion: kurrier.io/v1alpha1
        kind: RelayDomain
        metadata: {{name: {domain.replace(".", "-")}}}
        spec:
          domain: {domain}
          dkim: {{keys: [{listed}]}}""")


def inbound_domain(domain: str, recipients: Sequence[str] | None = None) -> str:
    """A RelayDomain taking mail for domain; with recipients, only for those local parts."""
    listed = "" if recipients is None else f", recipients: {json.dumps(list(recipients))}"
    return textwrap.dedent(f"""\
        apiVersion: kurrier.io/v1alpha1
        kind: RelayDomain
        metadata: {{name: {domain.replace(".", "-")}}}
        spec: {{domain: {domain}, acceptInbound: true{listed}}}""")


def trusting(*networks: str) -> str:
    return textwrap.dedent(f"""\
        apiVersion: kurrier.io/v1alpha1
        kind: RelayPolicy
        metadata: {{name: default}}
        spec: {{trustedNetworks: {json.dumps(list(networks))}}}""")


def documents(*parts: str) -> str:
    return "\n---\n".join(parts) + "\n"


def publish_config(nats_url: str, config: str) -> None:
    """Compile the resources file's text and publish the routing table, as `kurrier up` does."""
    table, problems = compile_table(parse_documents(yaml.safe_load_all(config), "test"))
    assert not problems, problems

    async def run() -> None:
        nc = await connect(nats_url, "test-publisher")
        try:
            await ensure_layout(nc.jetstream())
            await publish_table(nc.jetstream(), table)
        finally:
            await disconnect(nc)

    asyncio.run(run())


async def _queued_count(nats_url: str) -> int:
    # Through RecordStore, not kv.keys(): its pass leaves no consumer behind for
    # minutes, and a test polling the count many times a second would pile them up.
    return len(await _message_records(nats_url))


# What NATS answers while a cluster node catches up or a stream elects a leader:
# a polling caller simply asks again.
NATS_BUSY = (nats.errors.Error, nats.js.errors.Error)


def queued_count(nats_url: str) -> int:
    """Messages the queue still holds (not yet delivered or bounced); -1 when NATS did
    not answer (a cluster node catching up after a restart)."""
    try:
        return asyncio.run(_queued_count(nats_url))
    except NATS_BUSY:
        return -1


def wait_until_drained(nats_url: str, timeout: float, what: str = "the queue to drain") -> None:
    """Wait until the queue holds no message; on timeout, the failure says what it
    still holds, as the records tell it (a test left guessing cannot be fixed)."""
    remaining: list[MessageRecord] = []

    def drained() -> bool:
        try:
            remaining[:] = asyncio.run(_message_records(nats_url))
        except NATS_BUSY:
            return False
        return not remaining

    try:
        wait_until(drained, timeout, what)
    except AssertionError as error:
        raise AssertionError(f"{error}; still held: {describe_records(remaining)}") from None


def describe_records(records: Sequence[MessageRecord], at_most: int = 5) -> str:
    """Each record's state in one line: what a drain that did not happen left."""
    now = time.time()
    lines = [
        f"{r.queue_id} received {now - r.received_at:.0f}s ago, dispatches={r.dispatches}"
        f" held={r.held} scheduled={r.scheduled} recipients="
        + ", ".join(
            f"{s.address} {s.status} attempts={s.attempts}"
            f" next_attempt={s.next_attempt - now:+.0f}s reply={s.last_reply!r}"
            for s in r.recipients
        )
        for r in records[:at_most]
    ]
    more = f" and {len(records) - at_most} more" if len(records) > at_most else ""
    return f"{len(records)} record(s): " + "; ".join(lines) + more


async def _stored(nats_url: str, stream: str) -> int:
    nc = await connect(nats_url, "test-inspector")
    try:
        return (await nc.jetstream().stream_info(stream)).state.messages
    finally:
        await disconnect(nc)


def stored_bodies(nats_url: str) -> int:
    """Message bodies in the bodies stream; -1 when NATS did not answer."""
    try:
        return asyncio.run(_stored(nats_url, BODIES_STREAM))
    except NATS_BUSY:
        return -1


def stored_jobs(nats_url: str) -> int:
    """Jobs in the jobs stream, acknowledged ones included until the queue purges
    them; -1 when NATS did not answer."""
    try:
        return asyncio.run(_stored(nats_url, DISPATCH_STREAM))
    except NATS_BUSY:
        return -1


async def _message_records(nats_url: str) -> list[MessageRecord]:
    nc = await connect(nats_url, "test-inspector")
    try:
        store = await RecordStore.open(nc.jetstream())
        return [record async for record in store.all()]
    finally:
        await disconnect(nc)


def message_records(nats_url: str) -> list[MessageRecord]:
    """The queue's records of the messages it still holds, as stored in KV."""
    return asyncio.run(_message_records(nats_url))


class UpRelay:
    """`kurrier up` as a subprocess, as a user runs it."""

    def __init__(
        self,
        workdir: Path,
        config: str | None,
        *extra: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """config: the resource file's text; None when extra names the source (--kubeconfig);
        env is added to up's environment, which its children inherit (OTEL_*)."""
        self.workdir = workdir
        self.config = workdir / "resources.yaml"
        self.source: tuple[str, ...] = ()
        if config is not None:
            self.config.write_text(config)
            self.source = ("--config", str(self.config))
        self.data_dir = workdir / "data"
        self.smtp_port = free_port()
        self.extra = extra
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_line = ""

    def __enter__(self) -> UpRelay:
        self.log = (self.workdir / "up.log").open("ab")
        argv = kurrier_argv(
            "up",
            *self.source,
            "--data-dir",
            str(self.data_dir),
            "--smtp",
            f"127.0.0.1:{self.smtp_port}",
            *FAST_RETRIES,
            # Fixed ports collide between tests run side by side; a test asks for them.
            "--metrics-base-port",
            "off",
            *self.extra,
        )
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self.log, env={**os.environ, **self.env}
        )
        assert self.process.stdout is not None
        # `up` prints exactly one line, when SMTP accepts; EOF first means it died.
        self.ready_line = self.process.stdout.readline().decode()
        if not self.ready_line.startswith("kurrier ready"):
            self.__exit__()  # stop whatever it did start
            lines = (self.workdir / "up.log").read_text(errors="replace").splitlines()
            # nats-server's own lines ("[pid] ...") would crowd out the services' at shutdown.
            kurrier = [line for line in lines if not line.startswith("[")][-40:]
            raise AssertionError(
                f"kurrier up did not become ready: {self.ready_line!r}; the end of up.log:\n"
                + "\n".join(lines[-10:])
                + "\nthe last lines of up and its services:\n"
                + "\n".join(kurrier)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        stop_process(self.process, timeout=60)
        self.log.close()

    @property
    def state(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads((self.data_dir / "state.json").read_text())
        return loaded

    def pid(self, child: str) -> int:
        pids = self.state["pids"]
        assert isinstance(pids, dict)
        return int(pids[child])

    @property
    def nats_url(self) -> str:
        """The embedded NATS, logged in as the queue: the user that may read what tests inspect."""
        password = (self.data_dir / NATS_USERS_DIR / "queue").read_text()
        urls = str(self.state["nats_url"]).split(",")
        return ",".join(url.replace("nats://", f"nats://queue:{password}@") for url in urls)

    def queue_admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`kurrier queue ARGS --data-dir ...`, as an administrator runs it."""
        return subprocess.run(
            kurrier_argv("queue", *args, "--data-dir", str(self.data_dir)),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def table_revision_in_use(self, service: str) -> int:
        """The newest routing table revision a child ('ingress', 'delivery') logged it uses."""
        revisions = [0]
        for line in (self.workdir / "up.log").read_text(errors="replace").splitlines():
            if f'"kurrier-{service}"' in line:
                found = re.search(r"routing table revision (\d+) in use", line)
                revisions += [int(found.group(1))] if found else []
        return max(revisions)


class ServiceRelay:
    """queue, delivery and ingress as separate processes on a NATS the test controls.

    env is added to the services' environment (OTEL_*, KURRIER_*); with
    metrics=True each serves /metrics and /healthz on its `metrics_ports` entry;
    service_args adds flags to one service's command line ({"ingress": [...]},
    which every ingress gets). ingresses > 1 runs more ingress processes,
    "ingress-2", "ingress-3"..., as replicas, each on its own `smtp_ports` entry;
    deliveries > 1 more delivery processes, "delivery-2", "delivery-3"...
    """

    def __init__(
        self,
        workdir: Path,
        nats_url: str,
        env: Mapping[str, str] | None = None,
        metrics: bool = False,
        service_args: Mapping[str, Sequence[str]] | None = None,
        ingresses: int = 1,
        deliveries: int = 1,
    ) -> None:
        self.workdir = workdir
        self.nats_url = nats_url
        self.ingress_names = ["ingress", *(f"ingress-{n}" for n in range(2, ingresses + 1))]
        self.smtp_ports = {name: free_port() for name in self.ingress_names}
        self.smtp_port = self.smtp_ports["ingress"]
        self.queue_address = f"127.0.0.1:{free_port()}"
        self.published = False
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = dict(env or {})
        self.service_args = dict(service_args or {})
        delivery_names = ["delivery", *(f"delivery-{n}" for n in range(2, deliveries + 1))]
        # In start order; stopped in reverse.
        self.names = ("queue", *delivery_names, *self.ingress_names)
        self.metrics_ports = {name: free_port() for name in self.names} if metrics else {}

    def publish(self, config: str) -> None:
        publish_config(self.nats_url, config)
        self.published = True

    def start(self, name: str, wait: bool = True, env: Mapping[str, str] | None = None) -> None:
        """Start the service name; env, when given, in place of the relay's `env` (another
        release's, from bench.systems.kurrier_snapshot, or {} for this one's)."""
        command = name.partition("-")[0]
        common = [
            "--nats-url",
            self.nats_url,
            "--hostname",
            "relay.test",
            "--metrics-listen",
            f"127.0.0.1:{self.metrics_ports[name]}" if name in self.metrics_ports else "off",
        ]
        args = {
            "queue": ["--listen", self.queue_address, *FAST_RETRIES],
            "delivery": [],
            "ingress": [
                "--queue-address",
                self.queue_address,
                "--smtp",
                f"127.0.0.1:{self.smtp_ports.get(name)}",
            ],
        }[command]
        log = (self.workdir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen(
            kurrier_argv(command, *common, *args, *self.service_args.get(command, ())),
            stdout=log,
            stderr=log,
            env={**os.environ, **(self.env if env is None else env)},
        )
        if command == "queue" and wait:
            # The queue listens once its layout is complete (the history stream
            # too, which the others do not wait for).
            queue_port = int(self.queue_address.rsplit(":", 1)[1])
            wait_until(lambda: port_open(queue_port), 60, "the queue to listen")
        if command == "ingress" and wait:
            port = self.smtp_ports[name]
            wait_until(lambda: smtp_banner(port), 30, f"{name} to answer SMTP")
            if self.published:
                self.wait_for_table(name)
        if command == "delivery" and wait and self.published:
            # Takes jobs once it has a table: a test spreading jobs over several
            # delivery processes must not start before the last of them does.
            self._wait_for_line(name, "delivery started", f"{name} to take jobs", 60)

    def wait_for_table(self, name: str = "ingress", timeout: float = 30) -> None:
        """Until the service logged that a routing table is in use."""
        self._wait_for_line(
            name, "routing table revision", f"{name} to load the routing table", timeout
        )

    def _wait_for_line(self, name: str, text: str, what: str, timeout: float) -> None:
        log = self.workdir / f"{name}.log"
        wait_until(lambda: text in log.read_text(errors="replace"), timeout, what)

    def __enter__(self) -> ServiceRelay:
        try:
            for name in self.names:
                self.start(name)
        except BaseException:
            self.__exit__()  # a failed start must not leave the others running
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in reversed(self.names):
            if name in self.processes:
                stop_process(self.processes[name])
