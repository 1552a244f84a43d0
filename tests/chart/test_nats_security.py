"""The bundled NATS as the chart renders it by default: only the components get in, over
TLS, and each may do its own job and nothing else.

A real nats-server runs the rendered configuration, users and certificate
(tests/chart/rendered_nats.py). Each component logs in as the chart tells it
to (its KURRIER_NATS_* variables) through kurrier's own `connect`, to the
Service's name as its certificate names it: only name resolution is faked
(there is no cluster DNS here), `kurrier-nats` resolving to 127.0.0.1. A refusal
is a request nobody answers, and the server's log must name it as a
permissions violation of that user on that subject: not merely slow.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from kurrier.core.cluster_counters import ClusterBuckets, Rate
from kurrier.core.cluster_slots import ClusterSlots, Hold
from kurrier.core.jetstream import (
    BODIES_STREAM,
    CONFIG_BUCKET,
    DELIVERY_CONSUMER,
    DISPATCH_STREAM,
    OUTCOMES_STREAM,
    ROUTING_TABLE_KEY,
    SHAPING_BUCKET,
    body_subject,
    connect,
    disconnect,
    dispatch_subject,
    ensure_layout,
    outcome_subject,
    result_subject,
)
from kurrier.core.nats_access import COMPONENTS, chart_permissions
from kurrier.core.routing import compile_table
from kurrier.core.table_store import publish_table
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from tests.chart.rendered_nats import (
    NATS_NAME,
    LaidOut,
    RenderedNats,
    lay_out,
    render_nats,
    running,
)
from tests.support import REPO
from tests.support.chart import CHART, env_of, find
from tests.support.fleet import PREVIOUS_RELEASE
from tests.support.processes import wait_until

PERMISSIONS_FILE = CHART / "files" / "nats-permissions.json"
TABLE_SUBJECT = f"$KV.{CONFIG_BUCKET}.{ROUTING_TABLE_KEY}"
BODY = b"Subject: secret\r\n\r\nthe body nobody but queue and delivery may read\r\n"


@pytest.fixture(scope="module")
def rendered(helm_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> RenderedNats:
    return render_nats(helm_bin, tmp_path_factory.mktemp("render"), {})


@pytest.fixture(autouse=True)
def service_name_resolves_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster DNS's one answer these tests need: the NATS Service is 127.0.0.1."""
    real = socket.getaddrinfo

    def getaddrinfo(host: bytes | str | None, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host == NATS_NAME else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(scope="module")
def server(rendered: RenderedNats, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaidOut]:
    laid_out = lay_out(rendered, tmp_path_factory.mktemp("nats"))
    with running(laid_out):
        yield laid_out


class Component:
    """One component's connection, made as the chart's Deployment makes it."""

    def __init__(self, user: str, nc: NATS, log: Path) -> None:
        self.user = user
        self.nc = nc
        # Short: a refused request is one nobody answers.
        self.js: JetStreamContext = nc.jetstream(timeout=1.0)
        self._log = log

    async def refused(self, action: Awaitable[object], subject: str) -> None:
        """The action fails, and the server says why: this user may not publish there."""
        with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
            await action
        # subject is the start of the refused one (a consumer's adds its name and filter).
        line = f'"$G/user:{self.user}" - Publish Violation - Subject "{subject}'
        wait_until(lambda: line in self._log.read_text(), 10, f"the server to log: {line}")


async def write_table(component: Component) -> None:
    kv = await component.js.key_value(CONFIG_BUCKET)
    await kv.put(ROUTING_TABLE_KEY, b'{"revision": 99}')


@pytest_asyncio.fixture
async def as_component(
    rendered: RenderedNats, server: LaidOut, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[dict[str, Component]]:
    """Every component connected, each with the variables its Deployment renders."""
    connections: dict[str, Component] = {}
    for user in COMPONENTS:
        env = env_of(
            find(rendered.objects, "Deployment", f"kurrier-{user}")["spec"]["template"]["spec"][
                "containers"
            ][0]
        )
        password_file = tmp_path / user
        password_file.write_text(rendered.password(user))
        monkeypatch.setenv("KURRIER_NATS_USER", env["KURRIER_NATS_USER"])
        monkeypatch.setenv("KURRIER_NATS_PASSWORD_FILE", str(password_file))
        monkeypatch.setenv("KURRIER_NATS_TLS_CA", str(server.ca))
        url = env["KURRIER_NATS_URL"].replace(":4222", f":{server.client_port}")
        nc = await connect(url, f"kurrier-{user}")
        connections[user] = Component(user, nc, server.directory / "nats.log")
    try:
        yield connections
    finally:
        for component in connections.values():
            await disconnect(component.nc)


def test_the_server_demands_tls_and_a_login(server: LaidOut) -> None:
    with socket.create_connection(("127.0.0.1", server.client_port), timeout=5) as sock:
        info = json.loads(sock.makefile("rb").readline().removeprefix(b"INFO "))
    assert info["tls_required"] is True
    assert info["auth_required"] is True


@pytest.mark.asyncio
@pytest.mark.parametrize("password", [None, "wrong"])
async def test_a_client_without_the_password_is_refused(
    server: LaidOut, password: str | None
) -> None:
    tls = ssl.create_default_context(cafile=str(server.ca))
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        await nats.connect(
            f"tls://{NATS_NAME}:{server.client_port}",
            user="queue" if password else None,
            password=password,
            tls=tls,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=5,
        )


def test_the_certificate_serves_clients_and_routes(rendered: RenderedNats) -> None:
    """Routes are TLS both ways: every server presents this certificate as a client too."""
    cert = x509.load_pem_x509_certificate(rendered.tls["tls.crt"])
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) >= {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    assert "kurrier-nats" in dns and "*.kurrier-nats-headless" in dns
    assert "tls.key" in rendered.tls and "ca.key" not in rendered.tls


@pytest.mark.asyncio
async def test_each_component_does_its_job_and_nothing_else(
    as_component: dict[str, Component],
) -> None:
    queue, delivery = as_component["queue"], as_component["delivery"]
    ingress, operator = as_component["ingress"], as_component["operator"]

    # The operator creates the table's bucket and writes the table; the queue
    # creates the rest of the layout and stores a message and its job.
    await ensure_layout(operator.js, streams={f"KV_{CONFIG_BUCKET}"})
    table, _ = compile_table([])
    assert await publish_table(operator.js, table) >= 1
    await ensure_layout(queue.js, owner=True)
    await queue.js.publish(body_subject("q1"), BODY)
    await queue.js.publish(dispatch_subject("q1"), b"{}")

    # Ingress reads the routing table, spends from the limits every replica
    # shares, and reads nothing of bodies or jobs.
    kv = await ingress.js.key_value(CONFIG_BUCKET)
    assert (await kv.get(ROUTING_TABLE_KEY)).value
    limits = await ClusterBuckets.open(ingress.js, "client-messages", 1)
    assert await limits.take("192.0.2.1", Rate(1)) and not await limits.take("192.0.2.1", Rate(1))
    direct_get = f"$JS.API.DIRECT.GET.{BODIES_STREAM}.{body_subject('q1')}"
    await ingress.refused(
        ingress.js.get_last_msg(BODIES_STREAM, body_subject("q1"), direct=True), direct_get
    )
    await ingress.refused(
        ingress.js.publish(dispatch_subject("forged"), b"{}"), dispatch_subject("forged")
    )
    await ingress.refused(ingress.js.publish(result_subject("q1"), b"{}"), result_subject("q1"))
    await ingress.refused(ingress.js.publish(outcome_subject("q1"), b"{}"), outcome_subject("q1"))

    # Delivery takes the job, reads the body, reports a result; it cannot write the table.
    jobs = await delivery.js.pull_subscribe(
        dispatch_subject("*"), durable=DELIVERY_CONSUMER, stream=DISPATCH_STREAM
    )
    [job] = await jobs.fetch(1, timeout=5)
    await job.ack_sync()
    body = await delivery.js.get_last_msg(BODIES_STREAM, body_subject("q1"), direct=True)
    assert body.data == BODY
    await delivery.js.publish(result_subject("q1"), b"{}")
    await delivery.js.publish(outcome_subject("q1"), b"{}")
    await delivery.refused(write_table(delivery), TABLE_SUBJECT)
    # and shares its destination sites' slots with the other delivery processes.
    slots = ClusterSlots(await delivery.js.key_value(SHAPING_BUCKET))
    hold = await slots.try_take("site-test.connections", 1, hold_for=15)
    assert isinstance(hold, Hold)
    await slots.release(hold)
    await delivery.refused(
        delivery.js.publish(dispatch_subject("forged"), b"{}"), dispatch_subject("forged")
    )
    # Removing jobs is the queue's (queue/acked_cleanup.py): delivery only acknowledges.
    await delivery.refused(
        delivery.js.purge_stream(DISPATCH_STREAM), f"$JS.API.STREAM.PURGE.{DISPATCH_STREAM}"
    )
    # Results are the queue's to read and remove.
    await delivery.refused(
        delivery.js.purge_stream(OUTCOMES_STREAM), f"$JS.API.STREAM.PURGE.{OUTCOMES_STREAM}"
    )
    await delivery.refused(
        delivery.js.pull_subscribe(outcome_subject("*"), stream=OUTCOMES_STREAM),
        f"$JS.API.CONSUMER.CREATE.{OUTCOMES_STREAM}.",
    )

    # Nobody but the queue and delivery reads the bodies, by any way in.
    for outsider in (ingress, operator):
        await outsider.refused(
            outsider.js.get_last_msg(BODIES_STREAM, body_subject("q1")),
            f"$JS.API.STREAM.MSG.GET.{BODIES_STREAM}",
        )
        await outsider.refused(
            outsider.js.pull_subscribe(body_subject("q1"), stream=BODIES_STREAM),
            f"$JS.API.CONSUMER.CREATE.{BODIES_STREAM}.",
        )
    # The queue, which owns the layout, does not write the routing table either.
    await queue.refused(write_table(queue), TABLE_SUBJECT)


@pytest.mark.asyncio
async def test_no_component_reads_another_ones_replies(
    as_component: dict[str, Component], server: LaidOut
) -> None:
    """Replies (a body fetched by delivery, too) go to the asker's own inbox only."""
    ingress = as_component["ingress"]
    await ingress.nc.subscribe("_INBOX.delivery.>")
    await ingress.nc.flush()
    line = '"$G/user:ingress" - Subscription Violation - Subject "_INBOX.delivery.>"'
    log = server.directory / "nats.log"
    wait_until(lambda: line in log.read_text(), 10, f"the server to log: {line}")
    assert ingress.nc.is_connected


def test_each_component_gets_only_its_own_password(rendered: RenderedNats) -> None:
    for user in COMPONENTS:
        spec = find(rendered.objects, "Deployment", f"kurrier-{user}")["spec"]["template"]["spec"]
        env = env_of(spec["containers"][0])
        assert env["KURRIER_NATS_USER"] == user
        assert env["KURRIER_NATS_URL"].startswith("tls://")
        [volume] = [v for v in spec["volumes"] if v["name"] == "nats-password"]
        assert volume["secret"]["secretName"] == "kurrier-nats-auth"
        assert volume["secret"]["items"] == [{"key": user, "path": "password"}]
        assert len(rendered.password(user)) >= 32
    assert len({rendered.password(user) for user in COMPONENTS}) == len(COMPONENTS)


def test_the_chart_has_the_permissions_kurrier_declares() -> None:
    """The chart's copy of kurrier.core.nats_access, which `kurrier up` uses directly."""
    assert PERMISSIONS_FILE.read_text() == chart_permissions(), (
        f"{PERMISSIONS_FILE} is stale: run make nats-permissions"
    )


def test_each_component_may_still_do_what_its_previous_release_may() -> None:
    """An upgrade applies the chart's permissions while the previous release's pods
    still run (docs/deploy.md, Upgrades): none of them may lose a permission."""
    shown = subprocess.run(
        [
            "git",
            "-C",
            str(REPO),
            "show",
            f"{PREVIOUS_RELEASE}:{PERMISSIONS_FILE.relative_to(REPO)}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    previous = json.loads(shown.stdout)
    current = json.loads(chart_permissions())
    for component, allowed in previous.items():
        for direction in ("publish", "subscribe"):
            lost = set(allowed[direction]["allow"]) - set(current[component][direction]["allow"])
            assert not lost, f"{component} may no longer {direction} to {sorted(lost)}"
