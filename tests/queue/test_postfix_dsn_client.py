"""Debian's Postfix submitting with DSN parameters (its sendmail's -N, -V and -R) to
`kurrier up`: kurrier takes them as Postfix writes them, passes them on to a next
hop that offers DSN, and its own failure report carries them back (RFC 3464)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dsn_report import parse_report
from tests.support.postfix import postfix_log, private_postfix, sendmail
from tests.support.relay import UpRelay, documents, route, trusting
from tests.support.sink import Sink


@pytest.fixture
def dsn_sink() -> Iterator[Sink]:
    with Sink(dsn=True) as running:
        yield running


async def test_postfix_sendmail_dsn_options_reach_the_next_hop_and_the_bounce(
    tmp_path: Path, dsn_sink: Sink, sink: Sink
) -> None:
    dsn_sink.behaviour.rejected = {"Gone@dsn.example": "550 5.1.1 <Gone@dsn.example>: unknown"}
    config = documents(
        route("to-dsn", ["dsn.example"], dsn_sink.port),
        route("to-senders", ["senders.test"], sink.port),
        trusting("127.0.0.0/8"),
    )
    with UpRelay(tmp_path, config) as relay:
        async with private_postfix(relay.smtp_port) as postfix:
            sendmail(
                postfix,
                "s@senders.test",
                ["Rcpt@dsn.example", "Gone@dsn.example"],
                b"Subject: from postfix\n\nthe body\n",
                *("-N", "success,delay,failure", "-V", "Env+Id.1", "-R", "hdrs"),
            )
            [delivered] = await asyncio.to_thread(dsn_sink.wait_for, 1)
            [notice] = await asyncio.to_thread(sink.wait_for, 1)
            # Postfix's own smtp client sent it to kurrier.
            assert f"relay=127.0.0.1[127.0.0.1]:{relay.smtp_port}" in postfix_log(postfix)
    assert sorted(delivered.mail_parameters.split()[-2:]) == ["ENVID=Env+2BId.1", "RET=HDRS"]
    assert delivered.rcpt_parameters == (
        "NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;Rcpt@dsn.example",
    )
    assert notice.recipients == ("s@senders.test",)
    report = parse_report(notice.content)
    assert report.per_message["Original-Envelope-Id"] == "Env+Id.1"
    [group] = report.per_recipient
    assert group["Original-Recipient"] == "rfc822;Gone@dsn.example"
    assert (group["Action"], group["Status"]) == ("failed", "5.1.1")
    assert report.returned.get_content_type() == "text/rfc822-headers"
