"""kurrier spread over test hosts, as the chart spreads its pods over nodes.

Three hosts run a NATS node each (the StatefulSet), and the services beside
them (the Deployments): ingress on n1 and n3, a queue on n1 and n2, delivery
on n2 and n3. Each ingress reaches the queues over the network, another
host's queue first (as through the queue's Service, which rarely picks the
pod beside it), the other one when that does not answer. The SMTP load runs
on the `client` host, one load per ingress, the next hop on `sink`. Every
service's NATS URL lists its own host's node first. The test process watches
from the bridge's control address.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from kurrier.cli.nats_server import nats_server_argv, nats_server_env

from tests.support.load import SteadyLoad
from tests.support.nats import cluster_layout_error, streams_current
from tests.support.netns import Host, TestNetwork
from tests.support.processes import (
    kurrier_argv,
    port_open,
    smtp_banner,
    stop_process,
    wait_until,
)
from tests.support.relay import FAST_RETRIES, documents, publish_config, route, trusting
from tests.support.sink import Sink

HOSTS = ("n1", "n2", "n3", "client", "sink")
NATS_HOSTS = ("n1", "n2", "n3")
# process name -> host
SERVICES = {
    "queue-1": "n1",
    "queue-2": "n2",
    "delivery-1": "n2",
    "delivery-2": "n3",
    "ingress-1": "n1",
    "ingress-2": "n3",
}
INGRESSES = ("ingress-1", "ingress-2")
# ingress -> the queues it tries, in order (gRPC's pick_first fails over to the next)
QUEUES_OF = {"ingress-1": ("queue-2", "queue-1"), "ingress-2": ("queue-1", "queue-2")}
NATS_PORT = 4222
ROUTE_PORT = 6222
QUEUE_PORT = 7070
SMTP_PORT = 2525
RECIPIENT = "r@example.com"
# The release this one upgrades from (there are no release tags yet); moved on
# with each release, so each upgrade path is tried once.
PREVIOUS_RELEASE = "fffb44a"
# The load's sender; its domain routes to the sink too, so a bounce (DSN) arrives there.
SENDER_DOMAIN = "client.test"


def nats_name(host: str) -> str:
    return f"nats-{host}"


class Fleet:
    """The processes of one kurrier on a TestNetwork, started and stopped together.

    env: what the services run with beyond the test's environment (another
    release's code, by PYTHONPATH); publish: how the first routing table is
    published (nats_url, resources file).
    """

    def __init__(
        self,
        network: TestNetwork,
        workdir: Path,
        env: dict[str, str] | None = None,
        publish: Callable[[str, str], None] = publish_config,
    ) -> None:
        self.network = network
        self.env = env or {}
        self.publish = publish
        self.hosts = network.hosts
        self.workdir = workdir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.sink: Sink | None = None
        self.loads: dict[str, SteadyLoad] = {}  # by the ingress it sends to

    def host_of(self, process: str) -> Host:
        if process.startswith("nats-"):
            return self.hosts[process.removeprefix("nats-")]
        return self.hosts[SERVICES[process]]

    def nats_url(self, first: str = "n1") -> str:
        """Every node, starting with `first`'s: a client spread over the cluster."""
        order = NATS_HOSTS[NATS_HOSTS.index(first) :] + NATS_HOSTS[: NATS_HOSTS.index(first)]
        return ",".join(f"nats://{self.hosts[name].address}:{NATS_PORT}" for name in order)

    @property
    def control_url(self) -> str:
        return self.nats_url()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                self.host_of(name).argv(argv), stdout=log, stderr=log, env=env
            )

    def store(self, host: str) -> Path:
        return self.workdir / nats_name(host)

    def start_nats(self, host: str) -> None:
        """Start (or restart) host's node on its store."""
        address = self.hosts[host].address
        routes = ",".join(
            f"nats://{self.hosts[peer].address}:{ROUTE_PORT}" for peer in NATS_HOSTS if peer != host
        )
        argv = nats_server_argv(self.store(host), NATS_PORT, host=address)
        # Later flags win: the single-node name becomes this member's, with its peers.
        argv += ["--server_name", nats_name(host), "--cluster_name", "kurrier"]
        argv += ["--cluster", f"nats://{address}:{ROUTE_PORT}", "--routes", routes]
        self._spawn(nats_name(host), argv, nats_server_env())
        wait_until(lambda: port_open(NATS_PORT, address), 60, f"{nats_name(host)} to listen")

    def start_service(self, name: str, env: dict[str, str] | None = None) -> None:
        """Start name, with env instead of the fleet's own when given."""
        host = self.host_of(name)
        service = name.split("-")[0]
        if service == "queue":
            own = ["--listen", f"{host.address}:{QUEUE_PORT}", *FAST_RETRIES]
        elif service == "ingress":
            queues = [f"{self.host_of(queue).address}:{QUEUE_PORT}" for queue in QUEUES_OF[name]]
            own = ["--queue-address", "ipv4:" + ",".join(queues)]
            own += ["--smtp", f"{host.address}:{SMTP_PORT}"]
        else:
            own = []
        common = ["--nats-url", self.nats_url(host.name), "--nats-replicas", "3"]
        common += ["--hostname", f"{name}.relay.test", "--metrics-listen", "off"]
        extra = self.env if env is None else env
        self._spawn(name, kurrier_argv(service, *common, *own), {**os.environ, **extra})
        if service == "ingress":
            self._wait_for_ingress(name)

    def replace(self, name: str, env: dict[str, str] | None = None) -> None:
        """Replace a service's process as Kubernetes replaces a pod: SIGTERM, at most
        30 s to finish, then a new one (with env, when given)."""
        stop_process(self.processes.pop(name))
        self.start_service(name, env)

    def restart_nats(self, host: str) -> None:
        """Restart host's node on its store as a StatefulSet rolls a pod: SIGTERM,
        then a new one, ready once every stream has a leader and every replica
        is current again."""
        stop_process(self.processes.pop(nats_name(host)))
        self.start_nats(host)
        wait_until(lambda: streams_current(self.control_url), 120, f"{nats_name(host)} to catch up")

    def config(self) -> str:
        sink = self.hosts["sink"].address
        return documents(
            route("to-sink", [RECIPIENT.split("@")[1]], SMTP_PORT, host=sink),
            route("bounces", [SENDER_DOMAIN], SMTP_PORT, host=sink),
            trusting(self.network.network),
        )

    def __enter__(self) -> Fleet:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        for host in NATS_HOSTS:
            self.start_nats(host)
        wait_until(
            lambda: cluster_layout_error(self.control_url) is None, 120, "JetStream's R3 layout"
        )
        self.publish(self.control_url, self.config())
        self.sink = self.hosts["sink"].call(
            lambda: Sink(SMTP_PORT, self.hosts["sink"].address).__enter__()
        )
        for name in SERVICES:
            self.start_service(name)

    def _wait_for_ingress(self, name: str) -> None:
        address = self.host_of(name).address
        wait_until(lambda: smtp_banner(SMTP_PORT, address), 120, f"{name} to answer SMTP")
        log = self.workdir / f"{name}.log"
        wait_until(
            lambda: "routing table revision" in log.read_text(errors="replace"),
            60,
            f"{name} to load the routing table",
        )

    def start_loads(self, clients: int = 1) -> dict[str, SteadyLoad]:
        """A load from the client host on each ingress, `clients` sessions each."""
        for name in INGRESSES:
            # No budget: a long nemesis run sends over 100,000 messages to each.
            address = self.host_of(name).address
            load = SteadyLoad(
                SMTP_PORT, RECIPIENT, clients=clients, budget=None, host=address, name=name
            )
            self.loads[name] = self.hosts["client"].call(load.start)
        return self.loads

    def signal(self, name: str, number: signal.Signals) -> None:
        self.processes[name].send_signal(number)

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.kill()
        process.wait(timeout=30)

    def __exit__(self, *exc: object) -> None:
        for load in self.loads.values():
            load.stop()
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)  # a paused one cannot take SIGTERM
        for name in [*reversed(SERVICES), *(nats_name(h) for h in NATS_HOSTS)]:
            if name in self.processes:
                stop_process(self.processes.pop(name))
        if self.sink is not None:
            self.sink.__exit__()


@contextlib.contextmanager
def running_fleet(workdir: Path) -> Iterator[Fleet]:
    """A TestNetwork of HOSTS with a Fleet on it; everything removed on the way out."""
    with TestNetwork(HOSTS) as network, Fleet(network, workdir) as fleet:
        yield fleet
