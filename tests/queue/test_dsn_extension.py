"""The DSN extension (RFC 3461) end to end: parameters taken by ingress, kept by the
queue, passed on by delivery, and followed by the notifications (RFC 3464).

The real `kurrier up` runs against sinks on real sockets, one offering DSN
and one not; the client is smtplib sending the parameters as written (Postfix
as the client is tests/queue/test_postfix_dsn_client.py). Every notification
is parsed back by tests/support/dsn_report.py.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dsn_report import parse_report
from tests.support.nats import NatsServer
from tests.support.otlp_receiver import CollectedSpan, OtlpReceiver
from tests.support.relay import (
    ServiceRelay,
    UpRelay,
    documents,
    route,
    trusting,
    wait_until_drained,
)
from tests.support.sink import Sink

SENDER = "s@senders.test"
MESSAGE = b"From: s@senders.test\r\nSubject: dsn\r\n\r\nthe body text\r\n"


@pytest.fixture
def dsn_sink() -> Iterator[Sink]:
    """The next hop for dsn.example: offers DSN."""
    with Sink(dsn=True) as running:
        yield running


@pytest.fixture
def plain_sink() -> Iterator[Sink]:
    """The next hop for plain.example: does not offer DSN."""
    with Sink() as running:
        yield running


@pytest.fixture
def bounce_sink() -> Iterator[Sink]:
    """Where mail for senders.test (the notifications) goes."""
    with Sink() as running:
        yield running


def _config(dsn_sink: Sink, plain_sink: Sink, bounce_sink: Sink) -> str:
    return documents(
        route("to-dsn", ["dsn.example"], dsn_sink.port),
        route("to-plain", ["plain.example"], plain_sink.port),
        route("to-senders", ["senders.test"], bounce_sink.port),
        trusting("127.0.0.0/8"),
    )


def test_ingress_takes_dsn_parameters_strictly_and_delivery_passes_them_on(
    tmp_path: Path, dsn_sink: Sink, plain_sink: Sink, bounce_sink: Sink
) -> None:
    with UpRelay(tmp_path, _config(dsn_sink, plain_sink, bounce_sink)) as relay:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
            smtp.ehlo()
            assert smtp.has_extn("dsn")
            for bad in ("RET=BODY", "ENVID=" + "x" * 101, "ENVID=a=b", "RET=FULL RET=HDRS"):
                code, reply = smtp.mail(SENDER, options=bad.split())
                assert (code, reply[:5]) == (501, b"5.5.4"), (bad, reply)
            code, reply = smtp.mail(SENDER, options=["NOTIFY=NEVER"])
            assert (code, reply[:5]) == (501, b"5.5.4"), reply
            code, reply = smtp.mail(SENDER, options=["ret=hdrs", "ENVID=Batch+2B7.Q"])
            assert code == 250, reply
            for bad in (
                "NOTIFY=NEVER,SUCCESS",
                "NOTIFY=SOMETIMES",
                "ORCPT=no-type@example.com",
                "ORCPT=rfc822;bad+zz",
                "RET=FULL",
            ):
                code, reply = smtp.rcpt("a@dsn.example", options=bad.split())
                assert (code, reply[:5]) == (501, b"5.5.4"), (bad, reply)
            code, reply = smtp.rcpt(
                "a@dsn.example", options=["NOTIFY=delay,success", "ORCPT=rfc822;Orig+2BA@Ex.COM"]
            )
            assert code == 250, reply
            code, reply = smtp.rcpt("b@dsn.example", options=["NOTIFY=NEVER"])
            assert code == 250, reply
            code, reply = smtp.rcpt("c@dsn.example")
            assert code == 250, reply
            code, reply = smtp.data(MESSAGE)
            assert code == 250, reply
        [received] = dsn_sink.wait_for(1)
        wait_until_drained(relay.nats_url, 30)
    assert received.mail_parameters.split()[-2:] == ["RET=HDRS", "ENVID=Batch+2B7.Q"]
    assert received.recipients == ("a@dsn.example", "b@dsn.example", "c@dsn.example")
    assert received.rcpt_parameters == (
        "NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Orig+2BA@Ex.COM",
        "NOTIFY=NEVER",
        "",
    )
    # The next hop offers DSN, so it reports success itself: no "relayed" notice.
    assert bounce_sink.messages == []


def test_notifications_follow_notify_ret_envid_and_orcpt(
    tmp_path: Path, dsn_sink: Sink, plain_sink: Sink, bounce_sink: Sink
) -> None:
    plain_sink.behaviour.rejected = {
        "gone@plain.example": "550 5.1.1 <gone@plain.example>: user unknown",
        "never@plain.example": "550 5.1.1 <never@plain.example>: user unknown",
    }
    with UpRelay(tmp_path, _config(dsn_sink, plain_sink, bounce_sink)) as relay:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
            smtp.ehlo()
            assert smtp.mail(SENDER, options=["RET=HDRS", "ENVID=env-1"])[0] == 250
            for recipient, options in (
                ("ok@plain.example", ["NOTIFY=SUCCESS"]),
                ("gone@plain.example", ["NOTIFY=FAILURE", "ORCPT=rfc822;Gone@Plain.Example"]),
                ("never@plain.example", ["NOTIFY=NEVER"]),
            ):
                assert smtp.rcpt(recipient, options=options)[0] == 250
            assert smtp.data(MESSAGE)[0] == 250
        notices = bounce_sink.wait_for(2)
        wait_until_drained(relay.nats_url, 30)
    # The failure asked for and the relayed success; nothing for NOTIFY=NEVER.
    assert len(bounce_sink.messages) == 2
    [delivered] = plain_sink.messages
    assert "ENVID" not in delivered.mail_parameters  # not for a hop without DSN
    reports = {parse_report(n.content).per_recipient[0]["Action"]: n for n in notices}
    failed = parse_report(reports["failed"].content)
    assert failed.per_message["Original-Envelope-Id"] == "env-1"
    [group] = failed.per_recipient
    assert group["Final-Recipient"] == "rfc822; gone@plain.example"
    assert group["Original-Recipient"] == "rfc822;Gone@Plain.Example"
    assert group["Status"] == "5.1.1"
    assert failed.returned.get_content_type() == "text/rfc822-headers"  # RET=HDRS
    assert b"the body text" not in reports["failed"].content
    relayed = parse_report(reports["relayed"].content)
    assert relayed.per_message["Original-Envelope-Id"] == "env-1"
    [group] = relayed.per_recipient
    assert group["Final-Recipient"] == "rfc822; ok@plain.example"
    assert group["Status"] == "2.0.0"
    assert relayed.returned.get_content_type() == "text/rfc822-headers"


def _delay_warning_spans(spans: list[CollectedSpan], queue_id: str) -> list[CollectedSpan]:
    return [
        s
        for s in spans
        if s.name == "delay warning" and s.attributes["kurrier.dsn.original_queue_id"] == queue_id
    ]


def test_one_delay_warning_at_the_configured_age_in_the_message_trace(
    tmp_path: Path,
    nats_server: NatsServer,
    dsn_sink: Sink,
    plain_sink: Sink,
    bounce_sink: Sink,
) -> None:
    # Attempts at about 0, 1, 3 and 5 s (backoff 1 s, then 2 s): the
    # dispatch at 3 s is past the warning age, the fourth attempt delivers.
    plain_sink.behaviour.temp_failures = 3
    plain_sink.behaviour.temp_failure_reply = "451 4.7.1 greylisted, come back later"
    with OtlpReceiver() as receiver:
        relay = ServiceRelay(
            tmp_path,
            nats_server.url,
            env=receiver.env(),
            service_args={"queue": ["--delay-warning-time", "2s"]},
        )
        relay.publish(_config(dsn_sink, plain_sink, bounce_sink))
        with relay:
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
                smtp.ehlo()
                assert smtp.mail(SENDER, options=["ENVID=slow-1"])[0] == 250
                assert smtp.rcpt("late@plain.example")[0] == 250
                assert smtp.rcpt("quiet@plain.example", options=["NOTIFY=FAILURE"])[0] == 250
                code, reply = smtp.data(MESSAGE)
            assert code == 250, reply
            queue_id = reply.decode().rsplit(" ", 1)[-1]
            [notice] = bounce_sink.wait_for(1)
            plain_sink.wait_for(1)
            wait_until_drained(nats_server.url, 30)
            spans = receiver.wait_until(
                lambda s: bool(_delay_warning_spans(s, queue_id)), "the delay warning's span"
            )
    assert len(bounce_sink.messages) == 1  # once per message, not per deferral
    report = parse_report(notice.content)
    assert report.message["Subject"] == "Delayed Mail (still being retried)"
    assert report.per_message["Original-Envelope-Id"] == "slow-1"
    [group] = report.per_recipient  # quiet@ asked for failures only
    assert group["Final-Recipient"] == "rfc822; late@plain.example"
    assert (group["Action"], group["Status"]) == ("delayed", "4.7.1")
    assert "greylisted" in group["Diagnostic-Code"]
    assert group["Will-Retry-Until"]
    assert report.returned.get_content_type() == "text/rfc822-headers"
    [span] = _delay_warning_spans(spans, queue_id)
    assert span.attributes["kurrier.dsn.action"] == "delayed"
    message_trace = {s.trace_id for s in spans if s.queue_id == queue_id}
    assert message_trace == {span.trace_id}


def test_policy_sets_the_warning_age_and_queue_show_prints_the_dsn_parameters(
    tmp_path: Path, dsn_sink: Sink, plain_sink: Sink, bounce_sink: Sink
) -> None:
    # The queue keeps its default warning age (4 h): only the RelayPolicy's
    # delayWarningTime can make the warning come within the test.
    plain_sink.behaviour.temp_failures = 3
    policy = (
        "apiVersion: kurrier.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: default}\n"
        'spec: {trustedNetworks: ["127.0.0.0/8"], delayWarningTime: 2s}'
    )
    config = documents(
        route("to-plain", ["plain.example"], plain_sink.port),
        route("to-senders", ["senders.test"], bounce_sink.port),
        policy,
    )
    with UpRelay(tmp_path, config) as relay:
        with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=60) as smtp:
            smtp.ehlo()
            assert smtp.mail(SENDER, options=["RET=HDRS", "ENVID=env+2B1"])[0] == 250
            options = ["NOTIFY=DELAY,FAILURE", "ORCPT=rfc822;Late+2B@Plain.Example"]
            assert smtp.rcpt("late@plain.example", options=options)[0] == 250
            code, reply = smtp.data(MESSAGE)
        assert code == 250, reply
        queue_id = reply.decode().rsplit(" ", 1)[-1]
        shown = relay.queue_admin("show", queue_id)
        assert shown.returncode == 0, shown.stderr
        [notice] = bounce_sink.wait_for(1, timeout=30)
        plain_sink.wait_for(1)
    # As SMTP writes them on (xtext), for the message and for its recipient.
    assert "DSN:          RET=HDRS ENVID=env+2B1\n" in shown.stdout
    assert "    NOTIFY=FAILURE,DELAY ORCPT=rfc822;Late+2B@Plain.Example\n" in shown.stdout
    report = parse_report(notice.content)
    assert report.per_message["Original-Envelope-Id"] == "env+1"
    [group] = report.per_recipient
    assert (group["Action"], group["Original-Recipient"]) == (
        "delayed",
        "rfc822;Late+@Plain.Example",
    )
