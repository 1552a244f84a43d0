"""Building one delivery attempt in a test: a routing table, a message, a job."""

from __future__ import annotations

import textwrap

import yaml
from kurrier.core.loader import parse_documents
from kurrier.core.message import DeliveryJob, RecipientOutcome
from kurrier.core.routing import RoutingTable, compile_table

from tests.support.relay import documents


def table(*parts: str) -> RoutingTable:
    compiled, problems = compile_table(parse_documents(yaml.safe_load_all(documents(*parts)), "t"))
    assert not problems, problems
    return compiled


def message(subject: str, sender: str = "someone@sender.test") -> bytes:
    return (
        textwrap.dedent(f"""\
        Received: from client.test by relay.test; Mon, 1 Jan 2024 00:00:00 +0000
        From: Someone <{sender}>
        To: rcpt@dest.test
        Subject: {subject}
        Date: Mon, 1 Jan 2024 00:00:00 +0000
        Message-ID: <{subject}@sender.test>

        Body of {subject}.
        """)
        .replace("\n", "\r\n")
        .encode()
    )


def job(
    recipients: list[str], sender: str = "someone@sender.test", dispatch: int = 1
) -> DeliveryJob:
    return DeliveryJob(
        queue_id="TEST0000000000000001",
        dispatch=dispatch,
        mail_from=sender,
        recipients=recipients,
        size=0,
        body_store="stream",
    )


def by_address(outcomes: list[RecipientOutcome]) -> dict[str, tuple[str, str]]:
    return {o.address: (o.outcome, o.reply) for o in outcomes}
