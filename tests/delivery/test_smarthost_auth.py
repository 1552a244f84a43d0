"""Smarthost AUTH from the route's Secret (PLAIN or LOGIN, inside TLS only); route rate limits."""

from __future__ import annotations

from pathlib import Path

import pytest
from kurrier.core.resources import RelayRouteSpec
from kurrier.delivery.courier import Courier
from kurrier.delivery.sending_rate import MAX_WAIT, SendingRates
from pydantic import ValidationError

from tests.delivery.attempts import job, message, table
from tests.support.certs import self_signed_context
from tests.support.relay import route, secret
from tests.support.sink import Sink

AUTH = "{secretRef: {name: creds}}"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_succeeds_inside_tls(courier: Courier, tmp_path: Path, mechanism: str) -> None:
    other = "LOGIN" if mechanism == "PLAIN" else "PLAIN"
    with Sink(
        tls_context=self_signed_context(tmp_path, "127.0.0.1"),
        users={"relay": "s3cret"},
        auth_exclude=(other,),
    ) as sink:
        routes = table(
            secret("creds", username="relay", password="s3cret"),
            route("smarthost", ["*"], sink.port, tls="required", auth=AUTH),
        )
        [outcome] = await courier.deliver(job(["r@dest.test"]), message("auth"), routes)
        assert outcome.outcome == "delivered"
        assert [(m.auth_user, m.tls) for m in sink.messages] == [("relay", True)]
        assert sink.auth_attempts == [(mechanism, "relay", True)]


async def test_wrong_credentials_defer_with_the_servers_reply(
    courier: Courier, tmp_path: Path
) -> None:
    with Sink(
        tls_context=self_signed_context(tmp_path, "127.0.0.1"), users={"relay": "s3cret"}
    ) as sink:
        routes = table(
            secret("creds", username="relay", password="wrong"),
            route("smarthost", ["*"], sink.port, tls="required", auth=AUTH),
        )
        [outcome] = await courier.deliver(job(["r@dest.test"]), message("bad"), routes)
        assert sink.messages == []
    assert outcome.outcome == "deferred"
    assert outcome.reply.startswith(f"451 4.7.0 127.0.0.1:{sink.port}: AUTH failed: 535 5.7.8")
    assert "wrong" not in outcome.reply


async def test_credentials_never_cross_a_plaintext_session(courier: Courier) -> None:
    # The server offers AUTH without TLS and no STARTTLS: opportunistic TLS finds none.
    with Sink(users={"relay": "s3cret"}, auth_over_plaintext=True) as sink:
        routes = table(
            secret("creds", username="relay", password="s3cret"),
            route("smarthost", ["*"], sink.port, tls="opportunistic", auth=AUTH),
        )
        [outcome] = await courier.deliver(job(["r@dest.test"]), message("clear"), routes)
        assert sink.auth_attempts == []
        assert sink.messages == []
    assert outcome.outcome == "deferred"
    assert "refusing to send credentials without TLS" in outcome.reply


def test_routes_that_would_leak_credentials_are_invalid() -> None:
    base = {"match": {"recipientDomains": ["*"]}, "auth": {"secretRef": {"name": "c"}}}
    with pytest.raises(ValidationError, match="needs TLS"):
        RelayRouteSpec.model_validate(
            {**base, "destination": {"smarthost": {"host": "h"}}, "tls": {"mode": "none"}}
        )
    with pytest.raises(ValidationError, match="needs a 'smarthost'"):
        RelayRouteSpec.model_validate({**base, "destination": {"mx": {}}})


def test_sending_rate_window() -> None:
    now = [1000.0]
    rates = SendingRates(clock=lambda: now[0])
    assert [rates.reserve("r", 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    # Three more may start once the first three leave the 60-second window...
    now[0] = 1045.0
    assert [rates.reserve("r", 3) for _ in range(3)] == [15.0, 15.0, 15.0]
    # ...and the next slot (at 1120) is further off than a transaction may wait.
    assert 1120.0 - now[0] > MAX_WAIT
    assert rates.reserve("r", 3) is None
    now[0] = 1101.0
    assert rates.reserve("r", 3) == 19.0
    assert rates.reserve("other", 1) == 0.0  # routes are counted apart


async def test_a_route_over_its_rate_defers(courier: Courier) -> None:
    with Sink() as sink:
        routes = table(route("slow", ["*"], sink.port, rateLimit="{perMinute: 2}"))
        outcomes = [
            (await courier.deliver(job([f"r{n}@dest.test"]), message(f"n{n}"), routes))[0]
            for n in range(3)
        ]
        assert len(sink.messages) == 2
    assert [o.outcome for o in outcomes] == ["delivered", "delivered", "deferred"]
    assert outcomes[2].reply == "451 4.7.0 route slow is at its rate limit (2 per minute)"
