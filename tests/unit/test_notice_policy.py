"""Who may get delivery status notifications, by how the client proved itself (pure)."""

from __future__ import annotations

import pytest
from kurrier.core.loader import parse_documents
from kurrier.core.message import MessageRecord
from kurrier.core.routing import RoutingTable, compile_table
from kurrier.queue.notice_policy import withheld_because


def _table(scope: str | None) -> RoutingTable:
    spec = {"bounceUnauthenticated": scope} if scope else {}
    documents = [
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayDomain",
            "metadata": {"name": "own"},
            "spec": {"domain": "own.test"},
        },
        {
            "apiVersion": "kurrier.io/v1alpha1",
            "kind": "RelayPolicy",
            "metadata": {"name": "p"},
            "spec": spec,
        },
    ]
    return compile_table(parse_documents(documents, "t"))[0]


def _record(sender: str, identity: str = "", trusted: bool = False) -> MessageRecord:
    return MessageRecord(
        queue_id="01ABCDEF0123456789AB",
        mail_from=sender,
        recipients=[],
        received_at=0.0,
        size=0,
        body_store="stream",
        authenticated_as=identity,
        client_trusted=trusted,
    )


OUTSIDE = "victim@outside.test"
OWN = "user@OWN.test"


@pytest.mark.parametrize(
    ("scope", "record", "notified"),
    [
        # The default: only the relay's own domains, for a client that proved nothing.
        (None, _record(OUTSIDE), False),
        (None, _record(OWN), True),
        (None, _record(OUTSIDE, identity="alice"), True),
        (None, _record(OUTSIDE, trusted=True), True),
        ("all", _record(OUTSIDE), True),
        ("none", _record(OWN), False),
        ("none", _record(OUTSIDE, identity="system:serviceaccount:apps:web"), True),
        ("none", _record(OUTSIDE, trusted=True), True),
    ],
)
def test_notifications_by_client_and_policy(
    scope: str | None, record: MessageRecord, notified: bool
) -> None:
    assert (withheld_because(record, _table(scope)) is None) == notified


def test_the_reason_names_the_setting() -> None:
    reason = withheld_because(_record(OUTSIDE), _table(None))
    assert reason == (
        "the client neither authenticated nor was trusted, and bounceUnauthenticated "
        "is relayDomains"
    )
