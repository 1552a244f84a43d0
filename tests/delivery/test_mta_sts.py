"""MTA-STS (RFC 8461) on MX routes: parsing, and enforcement with a policy served over HTTPS.

The policy host is a real HTTPS server on port 443 of a loopback address,
found through the test's DNS server and trusted through the test CA, as a
public one would be through the public DNS and CAs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kurrier.delivery.courier import Courier
from kurrier.delivery.mail_exchangers import MailDns
from kurrier.delivery.mta_sts import StsPolicies, parse_policy, policy_id
from kurrier.delivery.tls_policy import client_context

from tests.delivery.attempts import by_address, job, message, publish_sts, sts_policy, table
from tests.support.certs import TestCA, self_signed_context
from tests.support.dns_server import DnsServer
from tests.support.policy_server import PolicyServer
from tests.support.processes import eventually
from tests.support.relay import mx_route
from tests.support.sink import Sink

OPPORTUNISTIC = table(mx_route("by-mx", ["*"], tls="opportunistic"))


def test_policy_files_and_txt_records_are_read_strictly() -> None:
    policy = parse_policy(sts_policy("enforce", "mx1.example.com", "*.example.net"), "abc", 100.0)
    assert (policy.mode, policy.mx, policy.max_age, policy.expires) == (
        "enforce",
        ("mx1.example.com", "*.example.net"),
        86400,
        86500.0,
    )
    assert policy.allows("MX1.example.com.")
    assert policy.allows("a.example.net")
    assert not policy.allows("a.b.example.net")  # '*' is exactly one label
    assert not policy.allows("example.net")
    for broken, why in [
        ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 99999999999\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: *.*.test\nmax_age: 1\n", "mx pattern"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_policy(broken, "abc", 0.0)
    assert policy_id(["v=STSv1; id=20240101T01;"]) == "20240101T01"
    assert policy_id(["v=spf1 -all", "v=STSv1; id=a1"]) == "a1"
    assert policy_id(["v=STSv1; id=a1", "v=STSv1; id=a2"]) is None  # ambiguous: no policy
    assert policy_id(["v=STSv1; id=not-alnum"]) is None
    assert policy_id([]) is None


async def test_enforce_skips_unlisted_hosts_and_keeps_the_policy_cached(
    courier: Courier, dns_server: DnsServer, mx_port: int, test_ca: TestCA
) -> None:
    publish_sts(dns_server, "sts.test", "127.0.1.1")
    policy = sts_policy("enforce", "mx2.sts.test")
    with (
        Sink(mx_port, "127.0.0.2") as unlisted,
        Sink(mx_port, "127.0.0.3", tls_context=test_ca.server_context("mx2.sts.test")) as listed,
    ):
        with PolicyServer("127.0.1.1", test_ca.server_context("mta-sts.sts.test"), policy) as web:
            first = await courier.deliver(job(["a@sts.test"]), message("s1"), OPPORTUNISTIC)
            second = await courier.deliver(job(["b@sts.test"]), message("s2"), OPPORTUNISTIC)
            assert web.requests == 1
        # The web server is gone; the cached policy (same id in DNS) still holds.
        third = await courier.deliver(job(["c@sts.test"]), message("s3"), OPPORTUNISTIC)
        assert [o.outcome for o in first + second + third] == ["delivered"] * 3
        assert unlisted.messages == []
        assert [m.tls for m in listed.messages] == [True, True, True]


async def test_enforce_demands_a_verified_certificate_whatever_the_route_says(
    courier: Courier, dns_server: DnsServer, mx_port: int, test_ca: TestCA, tmp_path: Path
) -> None:
    publish_sts(dns_server, "strict.test", "127.0.1.2")
    policy = sts_policy("enforce", "*.strict.test")
    self_signed = self_signed_context(tmp_path, "mx.strict.test")
    with (
        Sink(mx_port, "127.0.0.2", tls_context=self_signed) as first,
        Sink(mx_port, "127.0.0.3") as second,  # no STARTTLS at all
        PolicyServer("127.0.1.2", test_ca.server_context("mta-sts.strict.test"), policy),
    ):
        [outcome] = await courier.deliver(job(["a@strict.test"]), message("x"), OPPORTUNISTIC)
        assert first.messages == second.messages == []
    assert outcome.outcome == "deferred"
    assert outcome.reply.startswith("451 4.7.10 mx2.strict.test[127.0.0.3]")


async def test_testing_mode_delivers_as_the_route_says(
    courier: Courier, dns_server: DnsServer, mx_port: int, test_ca: TestCA, tmp_path: Path
) -> None:
    publish_sts(dns_server, "trial.test", "127.0.1.3")
    policy = sts_policy("testing", "mx.elsewhere.test")
    self_signed = self_signed_context(tmp_path, "mx1.trial.test")
    with (
        Sink(mx_port, "127.0.0.2", tls_context=self_signed) as first,
        PolicyServer("127.0.1.3", test_ca.server_context("mta-sts.trial.test"), policy) as web,
    ):
        [outcome] = await courier.deliver(job(["a@trial.test"]), message("t"), OPPORTUNISTIC)
        assert outcome.outcome == "delivered"
        assert [m.tls for m in first.messages] == [True]
        assert web.requests == 1


async def test_an_unreachable_policy_means_no_policy_until_one_is_fetched(
    courier: Courier, dns_server: DnsServer, mx_port: int, test_ca: TestCA, tmp_path: Path
) -> None:
    # The TXT record promises a policy, but its HTTPS host has a certificate nobody vouches for.
    publish_sts(dns_server, "nopolicy.test", "127.0.1.4")
    policy = sts_policy("enforce", "mx2.nopolicy.test")
    untrusted = self_signed_context(tmp_path, "mta-sts.nopolicy.test")
    with (
        Sink(mx_port, "127.0.0.2") as first,
        PolicyServer("127.0.1.4", untrusted, policy),
    ):
        outcomes = by_address(
            await courier.deliver(job(["a@nopolicy.test"]), message("n"), OPPORTUNISTIC)
        )
        assert outcomes["a@nopolicy.test"][0] == "delivered"
        assert len(first.messages) == 1


def _cached_mx(policies: StsPolicies) -> tuple[str, ...]:
    cached = policies.cached("fresh.test")
    return cached.mx if cached else ()


def _cached_id(policies: StsPolicies) -> str:
    cached = policies.cached("fresh.test")
    return cached.id if cached else ""


async def test_cached_policies_are_refreshed_ahead_of_expiry_and_on_a_new_id(
    dns_server: DnsServer, test_ca: TestCA
) -> None:
    now = [1_000_000.0]
    verify = client_context("verify", str(test_ca.ca_file))
    assert verify is not None
    policies = StsPolicies(MailDns(dns_server.address), verify, clock=lambda: now[0])
    publish_sts(dns_server, "fresh.test", "127.0.1.5")
    # TTL 0: each look at the TXT record asks the DNS server again.
    dns_server.add("_mta-sts.fresh.test", "TXT", '"v=STSv1; id=1"', ttl=0)
    with PolicyServer(
        "127.0.1.5", test_ca.server_context("mta-sts.fresh.test"), sts_policy("enforce", "mx1.x")
    ) as web:
        assert await policies.policy_for("fresh.test") is not None
        await policies.refresh()  # young, same id: nothing to do
        assert web.requests == 1
        web.policy = sts_policy("enforce", "mx2.x")
        now[0] += 86400 / 2  # half its max_age
        refresher = asyncio.create_task(policies.keep_fresh(interval=0.05))
        try:
            await eventually(lambda: _cached_mx(policies) == ("mx2.x",), 10, "the refresh")
            # A new id is fetched at its next refresh, however young the policy.
            web.policy = sts_policy("testing", "mx2.x")
            dns_server.add("_mta-sts.fresh.test", "TXT", '"v=STSv1; id=2"', ttl=0)
            await eventually(lambda: _cached_id(policies) == "2", 10, "the new id's policy")
        finally:
            refresher.cancel()
        assert web.requests == 3
    # The first policy would have expired now, with its host gone: the refreshed one holds.
    now[0] += 86400 / 2
    policy = await policies.policy_for("fresh.test")
    assert policy is not None and (policy.id, policy.mode, policy.mx) == (
        "2",
        "testing",
        ("mx2.x",),
    )
