"""Building one delivery attempt in a test: a routing table, a message, a job."""

from __future__ import annotations

import textwrap

import yaml
from kurrier.core.loader import parse_documents
from kurrier.core.message import DeliveryJob, RecipientOutcome
from kurrier.core.routing import RoutingTable, compile_table

from tests.support.dns_server import DnsServer
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
    recipients: list[str],
    sender: str = "someone@sender.test",
    dispatch: int = 1,
    require_tls: bool = False,
) -> DeliveryJob:
    return DeliveryJob(
        queue_id="TEST0000000000000001",
        dispatch=dispatch,
        mail_from=sender,
        recipients=recipients,
        size=0,
        body_store="stream",
        require_tls=require_tls,
    )


def by_address(outcomes: list[RecipientOutcome]) -> dict[str, tuple[str, str]]:
    return {o.address: (o.outcome, o.reply) for o in outcomes}


def sts_policy(mode: str, *mx: str) -> str:
    return (
        "version: STSv1\r\nmode: "
        + mode
        + "\r\n"
        + "".join(f"mx: {m}\r\n" for m in mx)
        + ("max_age: 86400\r\n")
    )


def publish_sts(dns_server: DnsServer, domain: str, policy_host: str, sts_id: str = "1") -> None:
    dns_server.add(f"_mta-sts.{domain}", "TXT", f'"v=STSv1; id={sts_id}"')
    dns_server.add(f"mta-sts.{domain}", "A", policy_host)
    dns_server.add(domain, "MX", f"10 mx1.{domain}.", f"20 mx2.{domain}.")
    dns_server.add(f"mx1.{domain}", "A", "127.0.0.2")
    dns_server.add(f"mx2.{domain}", "A", "127.0.0.3")
