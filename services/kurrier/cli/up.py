"""`kurrier up`: the whole relay on one machine, under one supervisor.

Starts an embedded nats-server (JetStream store under the data dir), publishes
the routing table compiled from the resource file, then runs queue, delivery
and ingress as child processes of this one. Each child gets, as flags, those
of up's settings it has too (kurrier.core.settings), and what up decides:
NATS URLs, the queue's address, the certificates of the mutual TLS between
ingress and the queue (`local_ca.py`), its own /metrics port on 127.0.0.1
(`--metrics-base-port` and up, or none).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kurrier.cli.local_ca import make_local_tls
from kurrier.cli.nats_server import (
    RouteTls,
    cluster_nodes,
    default_sync_interval,
    free_port,
    nats_server_argv,
    nats_server_env,
    port_is_free,
    reserve_ports,
    wait_for_port,
    write_config,
)
from kurrier.cli.nats_users import NatsUsers
from kurrier.cli.supervisor import Supervisor
from kurrier.core.addresses import parse_host_port
from kurrier.core.grpc_tls import QueueTls
from kurrier.core.jetstream import connect, ensure_layout
from kurrier.core.lifecycle import signal_event, stop_event
from kurrier.core.loader import ResourceError, load_resources
from kurrier.core.nats_access import streams_created
from kurrier.core.routing import compile_table
from kurrier.core.settings import SERVICES, SMTP, SMTPS, SUBMISSION, TABLE_KEYS, command_line
from kurrier.core.smtp_probe import wait_for_smtp_banner
from kurrier.core.table_secrets import (
    DELIVERY,
    INGRESS,
    PUBLISHER,
    TableKeys,
    local_key_directories,
)
from kurrier.core.table_store import publish_table
from nats.errors import Error as NatsError

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
# The NATS users' password files, in the data dir.
NATS_USERS_DIR = "nats-users"
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class UpSettings:
    config: Path | None
    # Instead of config: the resources of this cluster, through the operator.
    kubeconfig: Path | None
    namespaces: tuple[str, ...]
    data_dir: Path
    # 1: one embedded nats-server. 3 (or 5): a JetStream cluster of that many
    # nodes, kurrier's streams with 3 replicas and two queue and two delivery
    # processes, the shape the chart runs with a 3-replica NATS.
    nats_cluster: int
    # The values of the services' settings up takes (PASSED_ON_BY_UP), by name.
    passed_on: Mapping[str, object]
    # JetStream's sync_interval; None: default_sync_interval for the nodes.
    nats_sync: str | None = None
    # The first of the children's /metrics ports; None: they serve none.
    metrics_base_port: int | None = None

    @property
    def smtp(self) -> str:
        return str(self.passed_on[SMTP.name])


def child_argv(command: str, passed_on: Mapping[str, object], **values: object) -> list[str]:
    """`kurrier COMMAND` with those of up's settings the service has, and these values."""
    settings = SERVICES[command]
    names = {setting.name for setting in settings}
    shared = {name: value for name, value in passed_on.items() if name in names}
    flags = command_line(settings, {**shared, **values})
    return [sys.executable, "-m", "kurrier.cli", command, *flags]


async def _publish_config(
    nats_url: str, config: Path, replicas: int, keys: TableKeys, users: NatsUsers
) -> None:
    """Publish the table as the operator would, with the operator's NATS identity."""
    resources = load_resources(config)
    table, problems = compile_table(resources)
    for problem in problems:
        log.warning("%s %s: %s", problem.kind, problem.name, problem.message)
    nc = await connect(nats_url, "kurrier-up", "operator", users.password("operator"))
    try:
        js = nc.jetstream()
        created = streams_created("operator")
        await _until_jetstream_ready(lambda: ensure_layout(js, replicas, streams=created))
        revision = await publish_table(js, table, keys)
    finally:
        await nc.close()
    log.info("routing table revision %d published from %s", revision, config)


async def _until_jetstream_ready(attempt: Callable[[], Awaitable[None]]) -> None:
    """Retry while a fresh cluster still elects its leaders (it answers 503 meanwhile)."""
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
    while True:
        try:
            await attempt()
            return
        except (NatsError, TimeoutError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _start_nats(
    supervisor: Supervisor,
    data_dir: Path,
    nodes: int,
    sync: str | None,
    users: NatsUsers,
    routes: RouteTls,
) -> list[str]:
    """Start the embedded NATS (one server, or a cluster whose routes use mutual TLS
    with routes' certificate); returns the client URLs."""
    config = write_config(
        data_dir / "nats-server.conf",
        sync or default_sync_interval(nodes),
        users.authorization(),
        routes if nodes > 1 else None,
    )
    if nodes == 1:
        port = free_port()
        argv = nats_server_argv(data_dir / "nats", port, config=config)
        await supervisor.start("nats-server", argv, nats_server_env())
        await wait_for_port("127.0.0.1", port, timeout=30)
        return [f"nats://127.0.0.1:{port}"]
    urls = []
    for node in cluster_nodes(nodes):
        port = free_port()
        argv = nats_server_argv(data_dir / node.name, port, cluster=node, config=config)
        await supervisor.start(node.name, argv, nats_server_env())
        await wait_for_port("127.0.0.1", port, timeout=30)
        urls.append(f"nats://127.0.0.1:{port}")
    return urls


def _spread(urls: list[str], first: int) -> str:
    """All servers, starting at a different one per process, so load spreads over nodes."""
    first %= len(urls)
    return ",".join(urls[first:] + urls[:first])


async def _wait_for_smtp(address: str, timeout: float) -> None:
    """Ready means an SMTP banner, not just an open port."""
    host, port = parse_host_port(address, default_host="127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    await wait_for_smtp_banner(host, port, timeout)


async def _wait_for_queues(addresses: list[str], tls: QueueTls, timeout: float) -> None:
    """Ready means mail can be stored: every queue process's gRPC health says SERVING
    (ingress greets on its port before its queue may listen)."""
    for address in addresses:
        async with tls.channel(address) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True
                )
            except grpc.aio.AioRpcError as error:
                raise TimeoutError(f"the queue at {address} did not answer: {error}") from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise TimeoutError(f"the queue at {address} is not serving")


async def _wait_for_operator(address: str, timeout: float) -> None:
    """Ready means the operator has published the table it compiled from the cluster."""
    host, port = parse_host_port(address)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            async with asyncio.timeout(5):
                status_line = await reader.readline()
            writer.close()
            if status_line.split()[1:2] == [b"200"]:
                return
        except (OSError, TimeoutError):
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"the operator published no routing table within {timeout}s")
        await asyncio.sleep(0.1)


async def run_up(settings: UpSettings) -> int:
    problem = await _check_start(settings)
    if problem is not None:
        print(f"kurrier up: {problem}", file=sys.stderr)
        return 1
    stop = stop_event()
    reload = signal_event(signal.SIGHUP)
    relay = _LocalRelay(settings)
    try:
        await relay.start_nats()
        await relay.take_resources()  # publish the file, or start the operator
        await relay.start_services()
        await relay.wait_until_ready()
        relay.announce_ready()
        await relay.serve(stop, reload)
        return 0
    finally:
        await relay.stop()


def worker_pairs(nats_cluster: int) -> list[tuple[str, str]]:
    """The names of the queue and delivery processes: one of each, two on a cluster."""
    if nats_cluster == 1:
        return [("queue", "delivery")]
    return [(f"queue-{n}", f"delivery-{n}") for n in (1, 2)]


def metrics_ports(settings: UpSettings) -> dict[str, int]:
    """Each child's /metrics port, by child name: ingress first, then the queue and
    delivery processes, then the operator, on consecutive ports from the base."""
    if settings.metrics_base_port is None:
        return {}
    names = ["ingress"]
    for pair in worker_pairs(settings.nats_cluster):
        names += pair
    if settings.config is None:
        names.append("operator")
    return {name: settings.metrics_base_port + offset for offset, name in enumerate(names)}


def listener_ports(settings: UpSettings) -> set[int]:
    """The ports of the SMTP listeners up was asked for."""
    addresses = (settings.passed_on.get(setting.name) for setting in (SMTP, SUBMISSION, SMTPS))
    return {parse_host_port(str(address))[1] for address in addresses if address}


async def _check_start(settings: UpSettings) -> str | None:
    """Fail before starting anything: a resource file that does not load (it raises),
    a cluster the operator cannot serve, metrics ports taken (what to do is returned)."""
    if settings.config is not None:
        load_resources(settings.config)
    else:
        from kurrier.operator.main import OperatorError, check_cluster

        try:
            await check_cluster(settings.kubeconfig)
        except OperatorError as error:
            return str(error)
    taken = [port for port in metrics_ports(settings).values() if not port_is_free(port)]
    if taken:
        ports = ", ".join(map(str, taken))
        return f"metrics port(s) {ports} in use: choose --metrics-base-port PORT, or 'off'"
    return None


class _LocalRelay:
    """The processes of one `kurrier up`, where they listen, and its state file."""

    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        self.metrics_ports = metrics_ports(settings)
        # The children's own ports are picked before ingress binds its listeners.
        reserve_ports({*listener_ports(settings), *self.metrics_ports.values()})
        # The operator's /healthz says when it published; it is served even without metrics.
        self.operator_health = f"127.0.0.1:{self.metrics_ports.get('operator') or free_port()}"
        self.data_dir = settings.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.replicas = min(3, settings.nats_cluster)
        self.pairs = worker_pairs(settings.nats_cluster)
        if len(self.pairs) == 1:
            self.queue_listens = [f"unix:{self.data_dir / 'queue.sock'}"]
            self.queue_address = self.queue_listens[0]
        else:
            # gRPC's pick_first takes the first queue that answers: ingress fails over.
            self.queue_listens = [f"127.0.0.1:{free_port()}" for _ in self.pairs]
            self.queue_address = "ipv4:" + ",".join(self.queue_listens)
        # Mutual TLS between the children, as in the chart: another local user
        # reaching the queue's loopback port or socket gets nothing from it.
        self.tls = make_local_tls(self.data_dir / "tls")
        # Each child gets the key of the routing table's secrets it reads, no other.
        self.table_keys = local_key_directories(self.data_dir / "table-keys")
        self.publisher_keys = TableKeys.from_directory(self.table_keys[PUBLISHER])
        self.nats_urls: list[str] = []
        self.nats_users = NatsUsers.create(self.data_dir / NATS_USERS_DIR)
        self.ready = False
        self.supervisor = Supervisor(on_spawn=self.write_state)

    @property
    def nats_url(self) -> str:
        return ",".join(self.nats_urls)

    def write_state(self) -> None:
        # Tests and `kurrier queue --data-dir` find the live processes here.
        state = {
            "nats_url": self.nats_url,
            "queue_address": self.queue_address,
            # The admin commands' certificate: ingress's may only enqueue.
            "queue_tls": asdict(self.tls.admin),
            "smtp": self.settings.smtp,
            "ready": self.ready,
            "metrics": {name: f"127.0.0.1:{port}" for name, port in self.metrics_ports.items()},
            "pids": {child.name: child.pid for child in self.supervisor.children},
        }
        partial = self.data_dir / (STATE_FILE + ".part")
        partial.write_text(json.dumps(state))
        partial.replace(self.data_dir / STATE_FILE)

    async def start_nats(self) -> None:
        self.nats_urls = await _start_nats(
            self.supervisor,
            self.data_dir,
            self.settings.nats_cluster,
            self.settings.nats_sync,
            self.nats_users,
            self.tls.nats_routes,
        )

    async def take_resources(self) -> None:
        if self.settings.config is not None:
            await _publish_config(
                self.nats_url,
                self.settings.config,
                self.replicas,
                self.publisher_keys,
                self.nats_users,
            )
            return
        await self.supervisor.start(
            "operator",
            child_argv(
                "operator",
                self.settings.passed_on,
                nats_url=self.nats_url,
                nats_replicas=self.replicas,
                kubeconfig=self.settings.kubeconfig,
                namespaces=",".join(self.settings.namespaces),
                metrics_listen=self.operator_health,
            ),
            self._env(PUBLISHER, "operator"),
        )

    def _env(self, holder: str | None, user: str) -> dict[str, str]:
        """up's environment, with the routing table keys of holder (None: no keys) and
        the NATS login of user."""
        env = {k: v for k, v in os.environ.items() if k != TABLE_KEYS.variable}
        if holder is not None:
            env[TABLE_KEYS.variable] = str(self.table_keys[holder])
        return self.nats_users.environment(user, env)

    def _child_argv(self, name: str, command: str, index: int, **values: object) -> list[str]:
        port = self.metrics_ports.get(name)
        return child_argv(
            command,
            self.settings.passed_on,
            nats_url=_spread(self.nats_urls, index),
            nats_replicas=self.replicas,
            metrics_listen="off" if port is None else f"127.0.0.1:{port}",
            **values,
        )

    async def start_services(self) -> None:
        """Queue and delivery (a pair of each on a cluster), then ingress."""
        for index, (queue, delivery) in enumerate(self.pairs):
            await self.supervisor.start(
                queue,
                self._child_argv(
                    queue,
                    "queue",
                    index,
                    listen=self.queue_listens[index],
                    grpc_tls_cert=self.tls.queue.cert_file,
                    grpc_tls_key=self.tls.queue.key_file,
                    grpc_tls_client_ca=self.tls.queue.client_ca_file,
                ),
                self._env(None, "queue"),
            )
            await self.supervisor.start(
                delivery,
                self._child_argv(delivery, "delivery", index + 1),
                self._env(DELIVERY, "delivery"),
            )
        await self.supervisor.start(
            "ingress",
            self._child_argv(
                "ingress",
                "ingress",
                2,
                queue_address=self.queue_address,
                queue_tls_ca=self.tls.ingress.ca_file,
                queue_tls_cert=self.tls.ingress.cert_file,
                queue_tls_key=self.tls.ingress.key_file,
                queue_tls_server_name=self.tls.ingress.server_name,
            ),
            self._env(INGRESS, "ingress"),
        )

    async def wait_until_ready(self) -> None:
        await _wait_for_queues(self.queue_listens, self.tls.admin, READY_TIMEOUT)
        await _wait_for_smtp(self.settings.smtp, READY_TIMEOUT)
        if self.settings.config is None:
            await _wait_for_operator(self.operator_health, READY_TIMEOUT)
        self.ready = True
        self.write_state()

    def announce_ready(self) -> None:
        metrics = ",".join(f"{name}:{port}" for name, port in self.metrics_ports.items())
        print(
            f"kurrier ready smtp={self.settings.smtp} nats={self.nats_url} "
            f"data-dir={self.data_dir} metrics={metrics or 'off'}",
            flush=True,
        )

    async def serve(self, stop: asyncio.Event, reload: asyncio.Event) -> None:
        """Until stop; on reload (SIGHUP) publish the resource file again."""
        while not stop.is_set():
            stopped = asyncio.create_task(stop.wait())
            reloaded = asyncio.create_task(reload.wait())
            await asyncio.wait([stopped, reloaded], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            reloaded.cancel()
            if reload.is_set():
                reload.clear()
                if self.settings.config is None:
                    continue  # the operator follows the cluster: nothing to re-read
                try:
                    await _publish_config(
                        self.nats_url,
                        self.settings.config,
                        self.replicas,
                        self.publisher_keys,
                        self.nats_users,
                    )
                except ResourceError as error:
                    log.error("config not reloaded, keeping the live table:\n%s", error)

    async def stop(self) -> None:
        log.info("stopping: draining ingress, delivery, queue, then NATS")
        await self.supervisor.stop_all()
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)
