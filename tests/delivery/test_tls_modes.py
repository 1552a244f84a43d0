"""Route TLS modes against real STARTTLS sinks with certificates made in the test.

TLS failures defer (never plaintext, never a bounce); on MX routes they move
on to the next MX host, whose certificate may be fine.
"""

from __future__ import annotations

from pathlib import Path

from kurrier.delivery.courier import Courier

from tests.delivery.attempts import job, message, table
from tests.support.certs import TestCA, self_signed_context
from tests.support.dns_server import DnsServer
from tests.support.relay import mx_route
from tests.support.sink import Sink


def _one_mx(dns_server: DnsServer, domain: str, address: str) -> None:
    dns_server.add(domain, "MX", f"10 mx.{domain}.")
    dns_server.add(f"mx.{domain}", "A", address)


async def test_required_against_a_host_without_starttls_defers(
    courier: Courier, dns_server: DnsServer, mx_port: int
) -> None:
    _one_mx(dns_server, "plain.test", "127.0.0.2")
    with Sink(mx_port, "127.0.0.2") as sink:
        [outcome] = await courier.deliver(
            job(["a@plain.test"]), message("r"), table(mx_route("r", ["*"], tls="required"))
        )
        assert outcome.outcome == "deferred"
        assert outcome.reply.startswith("451 4.7.10 mx.plain.test[127.0.0.2]")
        assert "STARTTLS not offered" in outcome.reply
        assert sink.messages == []


async def test_opportunistic_uses_tls_when_offered_and_plaintext_only_when_not(
    courier: Courier, dns_server: DnsServer, mx_port: int, tmp_path: Path
) -> None:
    _one_mx(dns_server, "plain.test", "127.0.0.3")
    _one_mx(dns_server, "tls.test", "127.0.0.4")
    # Opportunistic TLS encrypts without authenticating: a self-signed certificate will do.
    tls = self_signed_context(tmp_path, "mx.tls.test")
    with Sink(mx_port, "127.0.0.3") as plain, Sink(mx_port, "127.0.0.4", tls_context=tls) as secure:
        outcomes = await courier.deliver(
            job(["a@plain.test", "b@tls.test"]), message("o"), table(mx_route("o", ["*"]))
        )
        assert [o.outcome for o in outcomes] == ["delivered", "delivered"]
        assert [m.tls for m in plain.messages] == [False]
        assert [m.tls for m in secure.messages] == [True]


async def test_verify_accepts_a_certificate_from_the_ca_for_the_mx_name(
    courier: Courier, dns_server: DnsServer, mx_port: int, test_ca: TestCA
) -> None:
    _one_mx(dns_server, "good.test", "127.0.0.5")
    with Sink(mx_port, "127.0.0.5", tls_context=test_ca.server_context("mx.good.test")) as sink:
        [outcome] = await courier.deliver(
            job(["a@good.test"]), message("v"), table(mx_route("v", ["*"], tls="verify"))
        )
        assert outcome.outcome == "delivered"
        assert [m.tls for m in sink.messages] == [True]


async def test_verify_rejects_self_signed_and_misnamed_certificates(
    courier: Courier, dns_server: DnsServer, mx_port: int, test_ca: TestCA, tmp_path: Path
) -> None:
    _one_mx(dns_server, "selfsigned.test", "127.0.0.6")
    _one_mx(dns_server, "misnamed.test", "127.0.0.7")
    self_signed = self_signed_context(tmp_path, "mx.selfsigned.test")
    misnamed = test_ca.server_context("some-other-host.test")
    with (
        Sink(mx_port, "127.0.0.6", tls_context=self_signed) as first,
        Sink(mx_port, "127.0.0.7", tls_context=misnamed) as second,
    ):
        outcomes = await courier.deliver(
            job(["a@selfsigned.test", "b@misnamed.test"]),
            message("x"),
            table(mx_route("v", ["*"], tls="verify")),
        )
        assert first.messages == second.messages == []
    for outcome in outcomes:
        assert outcome.outcome == "deferred"
        assert outcome.reply.startswith("451 4.7.5 ")
        assert "CERTIFICATE_VERIFY_FAILED" in outcome.reply
    assert "self-signed certificate" in outcomes[0].reply
    assert "mismatch" in outcomes[1].reply


async def test_a_tls_failure_moves_on_to_the_next_mx(
    courier: Courier, dns_server: DnsServer, mx_port: int, test_ca: TestCA, tmp_path: Path
) -> None:
    dns_server.add("mixed.test", "MX", "10 mx1.mixed.test.", "20 mx2.mixed.test.")
    dns_server.add("mx1.mixed.test", "A", "127.0.0.8")
    dns_server.add("mx2.mixed.test", "A", "127.0.0.9")
    bad = self_signed_context(tmp_path, "mx1.mixed.test")
    good = test_ca.server_context("mx2.mixed.test")
    with (
        Sink(mx_port, "127.0.0.8", tls_context=bad) as first,
        Sink(mx_port, "127.0.0.9", tls_context=good) as second,
    ):
        [outcome] = await courier.deliver(
            job(["a@mixed.test"]), message("m"), table(mx_route("v", ["*"], tls="verify"))
        )
        assert outcome.outcome == "delivered"
        assert first.messages == []
        assert len(second.messages) == 1
