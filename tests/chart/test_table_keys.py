"""The routing table keys as the chart renders and mounts them: the operator seals with
both, delivery and ingress each open only their own secrets, the queue holds none."""

from __future__ import annotations

from pathlib import Path

from kurrier.core.routing import CompiledPolicy, CompiledRoute, RoutingTable
from kurrier.core.table_secrets import TableKeys, open_table, seal_table

from tests.support.chart import Scenario, env_of, find, mount_secrets, render

# A '-' never occurs in base64, so the sealed form cannot contain it by chance.
PASSWORD = "route-password"
TABLE = RoutingTable(
    routes=(CompiledRoute(name="r", priority=1, recipient_domains=("*",), password=PASSWORD),),
    policy=CompiledPolicy(users={"alice": "$2b$04$hash"}),
)


def _keys(objects: list[dict[str, object]], component: str, root: Path) -> TableKeys:
    """The keys the component's pod gets, read where its KURRIER_TABLE_KEYS says."""
    mount_secrets(objects, f"kurrier-{component}", root / component)
    container = find(objects, "Deployment", f"kurrier-{component}")["spec"]["template"]["spec"][
        "containers"
    ][0]
    directory = env_of(container).get("KURRIER_TABLE_KEYS")
    if directory is None:
        return TableKeys()
    return TableKeys.from_directory(root / component / directory.lstrip("/"))


def test_each_pod_gets_the_keys_of_the_secrets_it_reads(helm_bin: Path, tmp_path: Path) -> None:
    objects = render(helm_bin, Scenario("table-keys"), tmp_path)
    stored = seal_table(TABLE, _keys(objects, "operator", tmp_path))
    assert PASSWORD.encode() not in stored and b"$2b$" not in stored

    delivery = open_table(stored, _keys(objects, "delivery", tmp_path))
    assert delivery.routes[0].password == PASSWORD and delivery.policy.users == {}
    ingress = open_table(stored, _keys(objects, "ingress", tmp_path))
    assert ingress.routes[0].password is None and ingress.policy.users == TABLE.policy.users
    queue = open_table(stored, _keys(objects, "queue", tmp_path))
    assert queue.routes[0].password is None and queue.policy.users == {}
