"""The routing table's secrets sealed for their one reader (core/table_secrets.py)."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest
from kurrier.core.routing import (
    CompiledDkimKey,
    CompiledDomain,
    CompiledPolicy,
    CompiledRoute,
    RoutingTable,
)
from kurrier.core.table_secrets import (
    DELIVERY,
    INGRESS,
    PUBLISHER,
    TableKeyError,
    TableKeys,
    local_key_directories,
    new_key,
    open_table,
    seal_table,
)

PASSWORD = "smarthost-password-7f3a"
PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"
HASH = "$2b$12$abcdefghijklmnopqrstuuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

TABLE = RoutingTable(
    revision=3,
    routes=(
        CompiledRoute(
            name="smarthost",
            priority=10,
            recipient_domains=("*",),
            smarthost=("relay.example", 587),
            username="relay",
            password=PASSWORD,
        ),
        CompiledRoute(name="other", priority=5, recipient_domains=("x.test",), password="other"),
    ),
    domains=(
        CompiledDomain(
            domain="signed.test",
            accept_inbound=False,
            dkim_keys=(CompiledDkimKey(selector="k1", private_key=PEM),),
        ),
    ),
    policy=CompiledPolicy(users={"alice": HASH}),
)


def _keys(*readers: str) -> TableKeys:
    every = {DELIVERY: base64.b64decode(new_key()), INGRESS: base64.b64decode(new_key())}
    return TableKeys({reader: every[reader] for reader in readers})


def test_the_stored_table_holds_no_secret_in_clear() -> None:
    keys = _keys(DELIVERY, INGRESS)
    stored = seal_table(TABLE, keys)
    for secret in (PASSWORD, HASH, "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "PRIVATE KEY"):
        assert secret.encode() not in stored
    assert stored.count(b"sealed:v1:delivery:") == 3
    assert stored.count(b"sealed:v1:ingress:") == 1
    assert open_table(stored, keys) == TABLE


def test_each_reader_opens_only_its_own_secrets() -> None:
    keys = _keys(DELIVERY, INGRESS)
    stored = seal_table(TABLE, keys)

    delivery = open_table(stored, TableKeys({DELIVERY: keys.keys[DELIVERY]}))
    assert delivery.routes[0].password == PASSWORD
    assert delivery.domains[0].dkim_keys[0].private_key == PEM
    assert delivery.policy.users == {}

    ingress = open_table(stored, TableKeys({INGRESS: keys.keys[INGRESS]}))
    assert ingress.policy.users == {"alice": HASH}
    assert [route.password for route in ingress.routes] == [None, None]
    assert ingress.domains[0].dkim_keys == ()
    # Everything that is not secret is the same for all.
    assert ingress.routes[0].smarthost == ("relay.example", 587)

    queue = open_table(stored, TableKeys())
    assert queue.policy.users == {} and queue.routes[0].password is None


def test_a_sealed_value_opens_only_where_it_was_sealed(caplog: pytest.LogCaptureFixture) -> None:
    keys = _keys(DELIVERY, INGRESS)
    stored = RoutingTable.model_validate_json(seal_table(TABLE, keys))
    moved = stored.model_copy(
        update={
            "routes": (
                stored.routes[0].model_copy(update={"password": stored.routes[1].password}),
                stored.routes[1],
            )
        }
    )
    with caplog.at_level(logging.ERROR):
        opened = open_table(moved.model_dump_json().encode(), keys)
    assert opened.routes[0].password is None
    assert opened.routes[1].password == "other"
    assert "does not open" in caplog.text and PASSWORD not in caplog.text
    # Another install's key opens nothing.
    assert open_table(seal_table(TABLE, keys), _keys(DELIVERY, INGRESS)).policy.users == {}


def test_a_publisher_without_keys_stores_in_clear_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        stored = seal_table(TABLE, TableKeys())
    assert PASSWORD.encode() in stored
    assert "4 secret(s) of the routing table stored in clear" in caplog.text
    assert open_table(stored, TableKeys()) == TABLE


def test_kurrier_up_gives_each_holder_its_keys_and_keeps_them(tmp_path: Path) -> None:
    holders = local_key_directories(tmp_path)
    assert sorted(p.name for p in holders[DELIVERY].iterdir()) == ["delivery.key"]
    assert sorted(p.name for p in holders[INGRESS].iterdir()) == ["ingress.key"]
    publisher = TableKeys.from_directory(holders[PUBLISHER])
    assert set(publisher.keys) == {DELIVERY, INGRESS}
    assert (holders[DELIVERY] / "delivery.key").stat().st_mode & 0o077 == 0
    assert TableKeys.from_directory(local_key_directories(tmp_path)[PUBLISHER]) == publisher

    (holders[INGRESS] / "ingress.key").write_text("c2hvcnQ=")
    with pytest.raises(TableKeyError, match="5 bytes, not 32"):
        TableKeys.from_directory(holders[INGRESS])
