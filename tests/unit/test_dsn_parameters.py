"""The DSN extension's parameters (RFC 3461) as ingress reads them and delivery writes them."""

from __future__ import annotations

import pytest
from kurrier.core.dsn_parameters import (
    DSN_KEYWORDS,
    BadParameter,
    MailParameters,
    RcptParameters,
    dsn_problem,
    given_once,
    mail_parameters,
    mail_parameters_text,
    notify_allows,
    rcpt_parameters,
    rcpt_parameters_text,
    split_parameters,
    xtext_decode,
    xtext_encode,
)


def test_xtext_round_trip_and_strictness() -> None:
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    for text in ("QQ 1!", "envid", "Mixed.Case+id=1"):
        assert xtext_decode(xtext_encode(text)) == text
    for bad in ("a=b", "a+2", "a+zz", "a+2b", "a b", "\u00e9", "a+0A"):
        with pytest.raises(BadParameter):
            xtext_decode(bad)


def test_split_keeps_case_of_values_and_refuses_repeats() -> None:
    rest, found = split_parameters("SIZE=10 ret=hdrs EnvId=AbC BODY=8BITMIME", DSN_KEYWORDS)
    assert rest == "SIZE=10 BODY=8BITMIME"
    assert given_once(found) == {"RET": "hdrs", "ENVID": "AbC"}
    for bad in ("RET=FULL RET=HDRS", "NOTIFY"):
        rest, found = split_parameters(bad, DSN_KEYWORDS)
        assert rest == ""
        with pytest.raises(BadParameter):
            given_once(found)


def test_mail_parameters() -> None:
    assert mail_parameters({"RET": "hdrs", "ENVID": "Q+2B1"}) == MailParameters("HDRS", "Q+1")
    assert mail_parameters({}) == MailParameters()
    for bad in ({"RET": "BODY"}, {"ENVID": ""}, {"ENVID": "x" * 101}, {"ENVID": "a=b"}):
        with pytest.raises(BadParameter):
            mail_parameters(bad)


def test_rcpt_parameters() -> None:
    given = {"NOTIFY": "delay,success", "ORCPT": "RFC822;Bob+2Bx@Example.com"}
    assert rcpt_parameters(given) == RcptParameters("SUCCESS,DELAY", "rfc822;Bob+x@Example.com")
    assert rcpt_parameters({"NOTIFY": "never"}).notify == "NEVER"
    for bad in (
        {"NOTIFY": "NEVER,FAILURE"},  # NEVER stands alone
        {"NOTIFY": "FAILURE,FAILURE"},
        {"NOTIFY": "SOMETIMES"},
        {"NOTIFY": ""},
        {"ORCPT": "bob@example.com"},  # no addr-type
        {"ORCPT": "rfc822;"},
        {"ORCPT": "rfc822;" + "x" * 500},
        {"ORCPT": "rfc822;a b@example.com"},
    ):
        with pytest.raises(BadParameter):
            rcpt_parameters(bad)


def test_notify_default_is_failure_and_delay_as_postfix() -> None:
    assert notify_allows("", "FAILURE") and notify_allows("", "DELAY")
    assert not notify_allows("", "SUCCESS")
    assert not notify_allows("NEVER", "FAILURE")
    assert notify_allows("SUCCESS", "SUCCESS") and not notify_allows("SUCCESS", "FAILURE")


def test_written_on_as_xtext() -> None:
    assert mail_parameters_text(MailParameters("FULL", "a b+c")) == ["RET=FULL", "ENVID=a+20b+2Bc"]
    assert mail_parameters_text(MailParameters()) == []
    written = rcpt_parameters_text(RcptParameters("NEVER", "rfc822;x+y@example.com"))
    assert written == ["NOTIFY=NEVER", "ORCPT=rfc822;x+2By@example.com"]


def test_kept_form_from_grpc_clients_is_checked() -> None:
    assert dsn_problem("HDRS", "id 1", [("SUCCESS,DELAY", "rfc822;a@b")]) == ""
    assert dsn_problem("hdrs", "", [])
    assert dsn_problem("", "\x00", [])
    assert dsn_problem("", "", [("DELAY,SUCCESS", "")])
    assert dsn_problem("", "", [("", "a@b")])
