"""Test hosts with their own addresses: network namespaces on one bridge.

Each `Host` is a network namespace whose `eth0` is one end of a veth pair; the
other end is enslaved to a bridge in the root namespace, which holds the
control address (`.1`) the test observes from. Only these addresses are
ever targets of a fault.

Every name carries the pid of the run that made it (`kn<pid>-n1`, `kn<pid>br`),
so a run first removes what runs that died without cleaning up left behind,
and never touches what a live run holds. Needs root and iproute2; the
one-way and per-port cuts need iptables (`scripts/testbin.sh` installs it)
and a kernel with netfilter inside network namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from tests.support.processes import wait_until

PREFIX = "kn"
_OWNED = re.compile(rf"^{PREFIX}(\d+)")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


def ip(*args: str) -> str:
    """Run `ip ARGS`; a failure raises with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_runs(names: Sequence[str]) -> list[str]:
    owned = [(name, _OWNED.match(name)) for name in names]
    return [name for name, found in owned if found and not _alive(int(found.group(1)))]


def _namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _link_names() -> list[str]:
    return [line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link").splitlines()]


def remove_leftovers() -> list[str]:
    """Delete the links and namespaces of runs whose process is gone; returns their names."""
    removed = []
    # Links first: deleting a namespace frees its veth pair only later, in the background.
    for link in _dead_runs(_link_names()):
        ip("link", "delete", link)
        removed.append(link)
    for namespace in _dead_runs(_namespaces()):
        # What a dead run started there (nats-server, services) would outlive the name.
        for pid in ip("netns", "pids", namespace).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        ip("netns", "delete", namespace)
        removed.append(namespace)
    return removed


def _enter(namespace: str) -> None:
    """Move the calling thread (only it) into the namespace."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns {namespace}: {os.strerror(error)}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str
    veth: str  # the root namespace's end of its link

    def argv(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the host (nsenter execs it: the pid is the program's)."""
        return ["nsenter", f"--net=/run/netns/{self.namespace}", *argv]

    def call(self, function: Callable[[], T]) -> T:
        """function's result, run in a thread inside the host.

        A thread's network namespace is its own, and threads it starts inherit
        it: a Sink or SteadyLoad started here listens and connects from this
        host for as long as it runs.
        """
        outcome: list[T] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                _enter(self.namespace)
                outcome.append(function())
            except BaseException as error:  # handed to the caller
                failure.append(error)

        thread = threading.Thread(target=run, name=f"in-{self.name}")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        return outcome[0]

    def set_link(self, up: bool) -> None:
        """Plug or unplug the host's cable: nothing reaches it, or leaves it, while down.

        Plugged back in, it returns once both ends have their carrier again and
        the bridge forwards to it: the kernel notices a carrier change in the
        background (up to a second later, more on a busy machine), and a
        connection tried before then is lost."""
        ip("link", "set", self.veth, "up" if up else "down")
        if up:
            wait_until(self._link_is_up, 30, f"{self.name}'s link to come back up")

    def _link_is_up(self) -> bool:
        inside = ip("-n", self.namespace, "-o", "link", "show", "eth0")
        with open(f"/sys/class/net/{self.veth}/operstate") as outside:
            root_end_up = outside.read().strip() == "up"
        with open(f"/sys/class/net/{self.veth}/brport/state") as port:
            forwarding = port.read().strip() == "3"  # BR_STATE_FORWARDING
        return root_end_up and forwarding and "state UP" in inside

    def drop_to(self, other: Host) -> None:
        """Drop what this host sends to other (one direction of a cut)."""
        ip("-n", self.namespace, "route", "add", "blackhole", f"{other.address}/32")

    def restore_to(self, other: Host) -> None:
        ip("-n", self.namespace, "route", "delete", "blackhole", f"{other.address}/32")

    def drop_from(self, other: Host) -> None:
        """Drop what this host receives from other, while what it sends still arrives.

        A one-way cut: a route cannot make one, since a TCP connection needs
        both directions; a filter on what comes in lets the segments out.
        """
        self._filter("--append", _from(other))

    def restore_from(self, other: Host) -> None:
        self._filter("--delete", _from(other))

    def drop_port_to(self, other: Host, port: int) -> None:
        """Drop TCP between this host and other's port, both ways; other ports still pass."""
        self._filter("--append", _port(other, port))

    def restore_port_to(self, other: Host, port: int) -> None:
        self._filter("--delete", _port(other, port))

    def degrade(self, rate: str, loss: float) -> None:
        """A slow, lossy link: what the host sends is held to `rate` (tbf: queued up
        to 200 ms, dropped beyond), and a random `loss` share of what it receives is
        dropped. tc's netem would add a fixed delay; this machine's kernel lacks it."""
        shape = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate]
        self._run([*shape, "burst", "32kbit", "latency", "200ms"])
        self._filter("--append", _random(loss))

    def restore_quality(self, loss: float) -> None:
        self._run(["tc", "qdisc", "delete", "dev", "eth0", "root"])
        self._filter("--delete", _random(loss))

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(self.argv(argv), capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{argv[0]} in {self.name}: {done.stderr.strip()}")

    def _filter(self, action: str, rules: list[list[str]]) -> None:
        for chain, *match in rules:
            self._run(["iptables", "--wait", action, chain, *match, "--jump", "DROP"])


def _from(other: Host) -> list[list[str]]:
    return [["INPUT", "--source", other.address]]


def _random(share: float) -> list[list[str]]:
    return [["INPUT", "--match", "statistic", "--mode", "random", "--probability", str(share)]]


def _port(other: Host, port: int) -> list[list[str]]:
    tcp = ["--protocol", "tcp"]
    return [
        ["OUTPUT", "--destination", other.address, *tcp, "--destination-port", str(port)],
        ["INPUT", "--source", other.address, *tcp, "--source-port", str(port)],
    ]


def _free_subnet() -> str:
    """A 10.213.X.0/24 no interface of this machine holds (runs side by side differ)."""
    taken = ip("-o", "-4", "addr")
    for _ in range(100):
        subnet = f"10.213.{random.randrange(1, 255)}"
        if f" {subnet}." not in taken:
            return subnet
    raise OSError("no free 10.213.X.0/24 subnet")


class TestNetwork:
    """Hosts named `names`, each at its own address on one bridge; removed on exit."""

    __test__ = False  # not a pytest class

    def __init__(self, names: Sequence[str]) -> None:
        self.run = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.run}br"
        self.subnet = _free_subnet()
        self.control_address = f"{self.subnet}.1"
        self.hosts = {
            name: Host(
                name, f"{self.run}-{name}", f"{self.subnet}.{index + 2}", f"{self.run}{name}"
            )
            for index, name in enumerate(names)
        }
        for host in self.hosts.values():
            if len(host.veth) > 15:
                raise ValueError(f"host name {host.name!r} makes too long a link name")

    @property
    def network(self) -> str:
        return f"{self.subnet}.0/24"

    def __enter__(self) -> TestNetwork:
        remove_leftovers()
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.control_address}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for host in self.hosts.values():
                self._add(host)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _add(self, host: Host) -> None:
        ip("netns", "add", host.namespace)
        ip("-n", host.namespace, "link", "set", "lo", "up")
        ip(
            "link",
            "add",
            host.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host.namespace,
        )
        ip("link", "set", host.veth, "master", self.bridge)
        ip("link", "set", host.veth, "up")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.namespace, "link", "set", "eth0", "up")
        # As when a cable is plugged back in (Host.set_link): the carrier comes
        # in the background, and a connection tried before it is lost.
        wait_until(host._link_is_up, 30, f"{host.name}'s link to come up")

    def __exit__(self, *exc: object) -> None:
        # Links first: deleting a namespace frees its veth pair only later, in the background.
        links = _link_names()
        for link in [host.veth for host in self.hosts.values()] + [self.bridge]:
            if link in links:
                ip("link", "delete", link)
        namespaces = _namespaces()
        for host in self.hosts.values():
            if host.namespace in namespaces:
                ip("netns", "delete", host.namespace)
