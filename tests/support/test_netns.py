"""Test hosts (tests/support/netns.py): own addresses, the cuts the nemesis makes, and
nothing left behind, also by a run that died."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import textwrap
import threading
import time

from tests.support.netns import PREFIX, Host, TestNetwork, ip, remove_leftovers
from tests.support.processes import wait_until


def _listening(host: Host, port: int) -> socket.socket:
    def listen() -> socket.socket:
        server = socket.socket()
        server.bind((host.address, port))
        server.listen(8)
        return server

    return host.call(listen)


def _reaches(address: str, port: int, source: Host | None = None) -> bool:
    """Whether a TCP connection from source (the root namespace when None) gets through."""

    def connect() -> bool:
        try:
            socket.create_connection((address, port), timeout=1).close()
        except OSError:
            return False
        return True

    return source.call(connect) if source else connect()


def _datagram_arrives(source: Host, target: Host, port: int) -> bool:
    """Whether a UDP datagram from source reaches a socket on target (it is never answered)."""
    return _datagrams_arriving(source, target, port, 1) == 1


def _names() -> str:
    """Every namespace and link of this machine, as ip lists them."""
    return ip("netns", "list") + ip("-o", "link")


def _gone(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_hosts_reach_each_other_until_cut_and_leave_nothing_behind() -> None:
    with TestNetwork(["a", "b"]) as network:
        a, b = network.hosts["a"], network.hosts["b"]
        with _listening(a, 2525):
            assert _reaches(a.address, 2525, b)
            assert _reaches(a.address, 2525)  # the control address on the bridge
            # Not from b's loopback: the listener is in a's namespace only.
            assert not _reaches("127.0.0.1", 2525, b)

            b.drop_to(a)
            assert not _reaches(a.address, 2525, b)
            assert _reaches(a.address, 2525)
            b.restore_to(a)
            assert _reaches(a.address, 2525, b)

            a.set_link(False)
            assert not _reaches(a.address, 2525, b)
            assert not _reaches(a.address, 2525)
            a.set_link(True)
            assert _reaches(a.address, 2525, b)

            b.drop_port_to(a, 2525)
            with _listening(a, 2526):
                assert not _reaches(a.address, 2525, b)
                assert _reaches(a.address, 2526, b)
            b.restore_port_to(a, 2525)
            assert _reaches(a.address, 2525, b)
    assert network.run not in _names()


def test_a_one_way_cut_lets_one_direction_through() -> None:
    with TestNetwork(["a", "b"]) as network:
        a, b = network.hosts["a"], network.hosts["b"]
        a.drop_from(b)
        assert _datagram_arrives(a, b, 5353)
        assert not _datagram_arrives(b, a, 5353)
        a.restore_from(b)
        assert _datagram_arrives(b, a, 5353)


def _datagrams_arriving(source: Host, target: Host, port: int, count: int) -> int:
    receiver = target.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with receiver:
        receiver.bind((target.address, port))
        receiver.settimeout(1)

        def send() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                for _ in range(count):
                    sender.sendto(b"ping", (target.address, port))

        source.call(send)
        arrived = 0
        with contextlib.suppress(TimeoutError):
            while arrived < count:
                receiver.recv(16)
                arrived += 1
        return arrived


def _seconds_to_send(source: Host, target: Host, port: int, size: int) -> float:
    """How long size bytes take from source until a reader on target has them all."""
    received: list[float] = []
    with _listening(target, port) as server:
        reader = threading.Thread(target=lambda: received.append(_read_all(server)))
        reader.start()
        started = time.monotonic()

        def send() -> None:
            with socket.create_connection((target.address, port), timeout=30) as client:
                client.sendall(b"x" * size)

        source.call(send)
        reader.join(timeout=30)
    return received[0] - started


def _read_all(server: socket.socket) -> float:
    """Read one connection to its end; when it ended."""
    connection, _ = server.accept()
    with connection:
        while connection.recv(65536):
            pass
    return time.monotonic()


def test_a_degraded_link_is_slow_and_lossy_until_restored() -> None:
    with TestNetwork(["a", "b"]) as network:
        a, b = network.hosts["a"], network.hosts["b"]
        a.degrade("1mbit", 0.5)
        # Half of what a receives is dropped (100 draws: 25-75 is 5 sigma each way).
        assert 25 <= _datagrams_arriving(b, a, 5353, 100) <= 75
        # 256 KiB at 1 Mbit/s takes about 2 s; unshaped, milliseconds. (Another port
        # each time: the last connection's port waits out TIME_WAIT.)
        assert _seconds_to_send(a, b, 2525, 256 * 1024) >= 1.0
        a.restore_quality(0.5)
        assert _datagrams_arriving(b, a, 5354, 100) == 100
        assert _seconds_to_send(a, b, 2526, 256 * 1024) < 1.0


def test_what_a_dead_run_left_is_removed_with_its_processes() -> None:
    # A run killed before its cleanup: its namespace, links and a process inside remain.
    script = textwrap.dedent("""
        import os, subprocess
        from tests.support.netns import TestNetwork, ip
        from tests.support.processes import wait_until
        network = TestNetwork(["x"]).__enter__()
        host = network.hosts["x"]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.Popen(host.argv(["sleep", "600"]), start_new_session=True, **quiet)
        # nsenter enters the namespace a moment after it starts.
        wait_until(lambda: ip("netns", "pids", host.namespace).split(), 30, "sleep inside")
        print(network.run, flush=True)
        os._exit(0)
        """)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert run.startswith(PREFIX) and run in _names()
    namespace = f"{run}-x"
    orphans = ip("netns", "pids", namespace).split()
    assert orphans

    removed = remove_leftovers()

    assert namespace in removed and f"{run}br" in removed
    assert run not in _names()
    wait_until(
        lambda: all(_gone(pid) for pid in orphans),
        10,
        "the dead run's process to be gone",
    )
