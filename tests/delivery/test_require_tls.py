"""REQUIRETLS (RFC 8689) and "TLS-Required: No" on the way out, against real sinks.

Next hops are real STARTTLS sinks with certificates of the test's CA (or
self-signed ones); the MTA-STS policy host is a real HTTPS server. Only DNS
is served by the test's own authoritative server (tests/support/dns_server.py),
since real DNS is not reachable here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kurrier.delivery.courier import Courier
from kurrier.delivery.require_tls import demand_of

from tests.delivery.attempts import job, message, publish_sts, sts_policy, table
from tests.support.certs import TestCA, self_signed_context
from tests.support.dns_server import DnsServer
from tests.support.policy_server import PolicyServer
from tests.support.processes import free_port
from tests.support.relay import mx_route, route
from tests.support.sink import Sink


def test_tls_required_no_is_read_from_the_header_section_only() -> None:
    def header(*fields: bytes) -> bytes:
        return b"".join(fields) + b"From: a@b.test\r\n\r\nTLS-Required: No\r\n"

    assert demand_of(False, header(b"tls-required:  NO \r\n")) == "optional"
    assert demand_of(False, header(b"TLS-Required:\r\n No\r\n")) == "optional"  # folded
    assert demand_of(False, header(b"TLS-Required: Nope\r\n")) == "default"
    assert demand_of(False, header()) == "default"  # the body's line is no header field
    assert demand_of(True, header(b"TLS-Required: No\r\n")) == "required"


def _smarthost(port: int) -> str:
    return route("smarthost", ["*"], port, tls="none")


async def test_a_smarthost_with_verified_tls_and_requiretls_gets_it_with_the_parameter(
    courier: Courier, test_ca: TestCA
) -> None:
    # The route says no TLS at all: REQUIRETLS raises it to a verified certificate.
    port = free_port()
    context = test_ca.server_context("127.0.0.1")
    with Sink(port, tls_context=context, require_tls=True) as sink:
        [asked] = await courier.deliver(
            job(["a@dest.test"], require_tls=True), message("r1"), table(_smarthost(port))
        )
        [plain] = await courier.deliver(
            job(["b@dest.test"]), message("r2"), table(_smarthost(port))
        )
    assert (asked.outcome, plain.outcome) == ("delivered", "delivered")
    first, second = sink.messages
    assert first.tls and first.mail_parameters.split()[-1] == "REQUIRETLS"
    # Without REQUIRETLS the route's mode holds (plaintext), and nothing is asked.
    assert not second.tls and "REQUIRETLS" not in second.mail_parameters


async def test_hops_that_cannot_meet_requiretls_bounce_it_with_5_7_30(
    courier: Courier, test_ca: TestCA, tmp_path: Path
) -> None:
    verified = test_ca.server_context("127.0.0.1")
    self_signed = self_signed_context(tmp_path, "127.0.0.1")
    cases: dict[str, Callable[[int], Sink]] = {
        "no REQUIRETLS": lambda port: Sink(port, tls_context=verified),
        "self-signed": lambda port: Sink(port, tls_context=self_signed, require_tls=True),
        "no STARTTLS": lambda port: Sink(port, require_tls=True),
    }
    for why, sink_at in cases.items():
        port = free_port()
        with sink_at(port) as sink:
            [outcome] = await courier.deliver(
                job(["a@dest.test"], require_tls=True), message("b"), table(_smarthost(port))
            )
        assert outcome.outcome == "bounced", (why, outcome)
        assert outcome.reply.startswith("550 5.7.30 127.0.0.1:"), (why, outcome.reply)
        assert sink.messages == [], why


async def test_mx_hosts_need_an_enforced_mta_sts_policy_and_a_reachable_hop_defers(
    courier: Courier, dns_server: DnsServer, mx_port: int, test_ca: TestCA
) -> None:
    by_mx = table(mx_route("by-mx", ["*"], tls="opportunistic"))
    # No MTA-STS: the MX record alone does not authenticate the hosts (no DNSSEC).
    dns_server.add("bare.test", "MX", "10 mx.bare.test.")
    dns_server.add("mx.bare.test", "A", "127.0.0.4")
    with Sink(
        mx_port, "127.0.0.4", tls_context=test_ca.server_context("mx.bare.test"), require_tls=True
    ) as bare:
        [outcome] = await courier.deliver(
            job(["a@bare.test"], require_tls=True), message("m1"), by_mx
        )
    assert outcome.outcome == "bounced"
    assert outcome.reply.startswith("550 5.7.30 the MX hosts of bare.test are not authenticated")
    assert bare.messages == []

    publish_sts(dns_server, "sts.test", "127.0.1.20")
    policy = sts_policy("enforce", "mx1.sts.test", "mx2.sts.test")
    with (
        PolicyServer("127.0.1.20", test_ca.server_context("mta-sts.sts.test"), policy),
        Sink(mx_port, "127.0.0.2", tls_context=test_ca.server_context("mx1.sts.test")) as weak,
        Sink(
            mx_port,
            "127.0.0.3",
            tls_context=test_ca.server_context("mx2.sts.test"),
            require_tls=True,
        ) as strong,
    ):
        # mx1 lacks REQUIRETLS; mx2 has it.
        [delivered] = await courier.deliver(
            job(["b@sts.test"], require_tls=True), message("m2"), by_mx
        )
        assert delivered.outcome == "delivered"
        assert [m.mail_parameters.split()[-1] for m in strong.messages] == ["REQUIRETLS"]
        assert weak.messages == []
    # mx2 is down now: one hop could not be reached at all, so no bounce yet.
    with Sink(mx_port, "127.0.0.2", tls_context=test_ca.server_context("mx1.sts.test")):
        [waiting] = await courier.deliver(
            job(["c@sts.test"], require_tls=True), message("m3"), by_mx
        )
    assert waiting.outcome == "deferred", waiting
    assert waiting.reply.startswith("451 4.4.1 mx2.sts.test[127.0.0.3]")


async def test_tls_required_no_sets_the_mta_sts_policy_aside(
    courier: Courier, dns_server: DnsServer, mx_port: int, test_ca: TestCA
) -> None:
    publish_sts(dns_server, "sts.test", "127.0.1.21")
    policy = sts_policy("enforce", "mx2.sts.test")
    by_mx = table(mx_route("by-mx", ["*"], tls="opportunistic"))
    relaxed = message("relaxed").replace(b"Subject:", b"TLS-Required: No\r\nSubject:")
    with (
        PolicyServer("127.0.1.21", test_ca.server_context("mta-sts.sts.test"), policy),
        Sink(mx_port, "127.0.0.2") as unlisted,  # plaintext, and not in the policy
        Sink(mx_port, "127.0.0.3", tls_context=test_ca.server_context("mx2.sts.test")) as listed,
    ):
        [strict] = await courier.deliver(job(["a@sts.test"]), message("strict"), by_mx)
        [loose] = await courier.deliver(job(["b@sts.test"]), relaxed, by_mx)
        # REQUIRETLS wins over the header field (RFC 8689 4.1).
        [both] = await courier.deliver(job(["c@sts.test"], require_tls=True), relaxed, by_mx)
    assert [o.outcome for o in (strict, loose)] == ["delivered", "delivered"]
    assert [m.recipients for m in listed.messages] == [("a@sts.test",)]
    assert [m.recipients for m in unlisted.messages] == [("b@sts.test",)]
    assert both.outcome == "bounced" and "5.7.30 mx2.sts.test" in both.reply
