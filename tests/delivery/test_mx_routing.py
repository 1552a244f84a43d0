"""MX routes: preference order, failover, implicit MX, null MX, IPv4 and IPv6.

A real authoritative DNS server (local, standing in for the public DNS the
test machine cannot reach) and real SMTP sinks on loopback addresses.
"""

from __future__ import annotations

from kurrier.delivery.courier import Courier

from tests.delivery.attempts import by_address, job, message, table
from tests.support.dns_server import DnsServer
from tests.support.relay import mx_route
from tests.support.sink import Sink

MX_EVERYWHERE = table(mx_route("by-mx", ["*"]))


async def test_the_most_preferred_mx_gets_the_mail(
    courier: Courier, dns_server: DnsServer, mx_port: int
) -> None:
    # Listed out of order on purpose: preference decides, not answer order.
    dns_server.add("pref.test", "MX", "20 mx2.pref.test.", "10 mx1.pref.test.")
    dns_server.add("mx1.pref.test", "A", "127.0.0.2")
    dns_server.add("mx2.pref.test", "A", "127.0.0.3")
    with Sink(mx_port, "127.0.0.2") as first, Sink(mx_port, "127.0.0.3") as second:
        outcomes = await courier.deliver(job(["a@pref.test"]), message("pref"), MX_EVERYWHERE)
        assert by_address(outcomes)["a@pref.test"][0] == "delivered"
        assert [m.recipients for m in first.messages] == [("a@pref.test",)]
        assert second.messages == []


async def test_refused_connection_moves_on_to_the_next_mx(
    courier: Courier, dns_server: DnsServer, mx_port: int
) -> None:
    dns_server.add("failover.test", "MX", "10 down.failover.test.", "20 up.failover.test.")
    dns_server.add("down.failover.test", "A", "127.0.0.4")  # nothing listens there
    dns_server.add("up.failover.test", "A", "127.0.0.5")
    with Sink(mx_port, "127.0.0.5") as backup:
        outcomes = await courier.deliver(job(["a@failover.test"]), message("f"), MX_EVERYWHERE)
        assert by_address(outcomes)["a@failover.test"][0] == "delivered"
        assert len(backup.messages) == 1


async def test_4xx_before_data_moves_on_and_4xx_after_data_defers(
    courier: Courier, dns_server: DnsServer, mx_port: int
) -> None:
    dns_server.add("busy.test", "MX", "10 mx1.busy.test.", "20 mx2.busy.test.")
    dns_server.add("mx1.busy.test", "A", "127.0.0.6")
    dns_server.add("mx2.busy.test", "A", "127.0.0.7")
    with Sink(mx_port, "127.0.0.6") as first, Sink(mx_port, "127.0.0.7") as second:
        first.behaviour.rejected["greylisted@busy.test"] = "451 4.7.1 greylisted"
        outcomes = by_address(
            await courier.deliver(
                job(["greylisted@busy.test", "fine@busy.test"]), message("m1"), MX_EVERYWHERE
            )
        )
        assert outcomes["greylisted@busy.test"][0] == "delivered"
        assert outcomes["fine@busy.test"][0] == "delivered"
        assert [m.recipients for m in first.messages] == [("fine@busy.test",)]
        assert [m.recipients for m in second.messages] == [("greylisted@busy.test",)]

        # After the content was sent a 4xx is the answer: another host could duplicate it.
        first.behaviour.temp_failures = 1
        [after_data] = await courier.deliver(job(["x@busy.test"]), message("m2"), MX_EVERYWHERE)
        assert (after_data.outcome, after_data.reply) == ("deferred", "451 4.3.0 try again later")
        assert len(second.messages) == 1


async def test_5xx_bounces_without_trying_other_hosts(
    courier: Courier, dns_server: DnsServer, mx_port: int
) -> None:
    dns_server.add("strict.test", "MX", "10 mx1.strict.test.", "20 mx2.strict.test.")
    dns_server.add("mx1.strict.test", "A", "127.0.0.8")
    dns_server.add("mx2.strict.test", "A", "127.0.0.9")
    with Sink(mx_port, "127.0.0.8") as first, Sink(mx_port, "127.0.0.9") as second:
        first.behaviour.rejected["nobody@strict.test"] = "550 5.1.1 no such user"
        opened = second.connections_total  # the sink's own start-up probe counts too
        [bounced] = await courier.deliver(job(["nobody@strict.test"]), message("b"), MX_EVERYWHERE)
        assert (bounced.outcome, bounced.reply) == ("bounced", "550 5.1.1 no such user")
        assert second.connections_total == opened


async def test_every_host_failing_defers_with_the_last_reply(
    courier: Courier, dns_server: DnsServer, mx_port: int
) -> None:
    dns_server.add("allbusy.test", "MX", "10 mx1.allbusy.test.", "20 mx2.allbusy.test.")
    dns_server.add("mx1.allbusy.test", "A", "127.0.0.10")  # refuses connections
    dns_server.add("mx2.allbusy.test", "A", "127.0.0.11")
    with Sink(mx_port, "127.0.0.11") as second:
        second.behaviour.rejected["a@allbusy.test"] = "452 4.2.2 mailbox full"
        [outcome] = await courier.deliver(job(["a@allbusy.test"]), message("x"), MX_EVERYWHERE)
    assert (outcome.outcome, outcome.reply) == ("deferred", "452 4.2.2 mailbox full")


async def test_ipv6_mail_hosts(courier: Courier, dns_server: DnsServer, mx_port: int) -> None:
    dns_server.add("six.test", "MX", "10 mx.six.test.")
    dns_server.add("mx.six.test", "AAAA", "::1")
    # A dual-stack host whose IPv4 address refuses: its IPv6 address is tried next.
    dns_server.add("dual.test", "MX", "10 mx.dual.test.")
    dns_server.add("mx.dual.test", "A", "127.0.0.12")
    dns_server.add("mx.dual.test", "AAAA", "::1")
    with Sink(mx_port, "::1") as sink:
        outcomes = by_address(
            await courier.deliver(job(["a@six.test", "b@dual.test"]), message("v6"), MX_EVERYWHERE)
        )
        assert outcomes == {
            "a@six.test": ("delivered", "250 2.0.0 Ok: sunk"),
            "b@dual.test": ("delivered", "250 2.0.0 Ok: sunk"),
        }
        assert sorted(m.recipients for m in sink.messages) == [("a@six.test",), ("b@dual.test",)]


async def test_a_domain_without_mx_is_its_own_mail_host(
    courier: Courier, dns_server: DnsServer, mx_port: int
) -> None:
    dns_server.add("implicit.test", "A", "127.0.0.13")
    with Sink(mx_port, "127.0.0.13") as sink:
        [outcome] = await courier.deliver(job(["a@implicit.test"]), message("i"), MX_EVERYWHERE)
        assert outcome.outcome == "delivered"
        assert len(sink.messages) == 1


async def test_null_mx_bounces_at_once(courier: Courier, dns_server: DnsServer) -> None:
    dns_server.add("nomail.test", "MX", "0 .")
    dns_server.add("nomail.test", "A", "127.0.0.14")  # must not be used as an implicit MX
    [outcome] = await courier.deliver(job(["a@nomail.test"]), message("n"), MX_EVERYWHERE)
    assert outcome.outcome == "bounced"
    assert outcome.reply.startswith("556 5.1.10 ")
    assert dns_server.questions[("nomail.test", "A")] == 0


async def test_dns_answers_decide_bounce_or_deferral(
    courier: Courier, dns_server: DnsServer
) -> None:
    dns_server.fail("broken.test")
    dns_server.add("mx.nowhere.test", "TXT", '"no address here"')
    dns_server.add("dangling.test", "MX", "10 mx.nowhere.test.")
    outcomes = by_address(
        await courier.deliver(
            job(["a@missing.test", "b@broken.test", "c@dangling.test"]),
            message("d"),
            MX_EVERYWHERE,
        )
    )
    assert outcomes["a@missing.test"][0] == "bounced"
    assert outcomes["a@missing.test"][1].startswith("550 5.1.2 ")
    assert outcomes["b@broken.test"][0] == "deferred"
    assert outcomes["b@broken.test"][1].startswith("451 4.4.3 ")
    assert outcomes["c@dangling.test"][0] == "bounced"
    assert outcomes["c@dangling.test"][1].startswith("550 5.4.4 ")


async def test_answers_are_cached_for_their_ttl(
    courier: Courier, dns_server: DnsServer, mx_port: int
) -> None:
    dns_server.add("cached.test", "MX", "10 mx.cached.test.", ttl=300)
    dns_server.add("mx.cached.test", "A", "127.0.0.15", ttl=300)
    with Sink(mx_port, "127.0.0.15") as sink:
        for number in range(3):
            await courier.deliver(job([f"r{number}@cached.test"]), message("c"), MX_EVERYWHERE)
        assert len(sink.messages) == 3
    assert dns_server.questions[("cached.test", "MX")] == 1
    assert dns_server.questions[("mx.cached.test", "A")] == 1
