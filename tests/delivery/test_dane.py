"""DANE (RFC 7672) on MX routes against real STARTTLS sinks and a real DNSSEC chain:
DANE-EE and DANE-TA records that match, records that do not (the hop defers), a
record whose signature does not fit (bogus: deferred), and TLSA records DANE
must not trust (an unsigned zone, an insecure delegation, a resolver not
trusted).

DNS is the test's own (tests/support/dnssec.py): the public DNS is not
reachable here. The zone is signed with ldns-signzone and served by a real
unbound that validates it against the zone's key as trust anchor, so the AD
bit kurrier trusts is a validator's verdict and nothing here is mocked.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kurrier.delivery.courier import Courier

from tests.delivery.attempts import job, message, table
from tests.support.certs import TestCA, self_signed_context
from tests.support.dnssec import ValidatingDns
from tests.support.relay import mx_route
from tests.support.sink import Sink

BY_MX = table(mx_route("by-mx", ["*"], tls="opportunistic"))
NO_SUCH_KEY = "3 1 1 " + "00" * 32


def _spki_sha256(pem: bytes) -> str:
    certificate = x509.load_pem_x509_certificate(pem)
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _cert_sha256(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def _mail_host(dns: ValidatingDns, domain: str, address: str, port: int, *tlsa: str) -> str:
    """domain's one MX host, at address, with TLSA records for port; its name."""
    host = f"mx.{domain}"
    dns.add(domain, "MX", f"10 {host}.")
    dns.add(host, "A", address)
    if tlsa:
        dns.add(f"_{port}._tcp.{host}", "TLSA", *tlsa)
    return host


def _self_signed(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, str]:
    """A server context with a self-signed certificate for name, and its DANE-EE record."""
    context = self_signed_context(tmp_path, name)
    pem = (tmp_path / f"self-signed-{name}.crt").read_bytes()
    return context, f"3 1 1 {_spki_sha256(pem)}"


def _context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


def _with_ca(test_ca: TestCA, tmp_path: Path, name: str) -> tuple[ssl.SSLContext, bytes]:
    """A server context whose chain ends in the test CA (DANE-TA needs the TA sent)."""
    cert_file, key_file = test_ca.issue(name)
    chain = tmp_path / f"{name}.chain.pem"
    chain.write_bytes(cert_file.read_bytes() + test_ca.ca_file.read_bytes())
    return _context(chain, key_file), cert_file.read_bytes()


async def test_dane_ee_and_dane_ta_records_that_match_authenticate_the_hop(
    dane_courier: Courier,
    validating_dns: ValidatingDns,
    mx_port: int,
    test_ca: TestCA,
    tmp_path: Path,
) -> None:
    # DANE-EE: the server's own key, self-signed (no CA vouches for it, no name check).
    ee_context, ee_record = _self_signed(tmp_path, "mx.ee.signed.test")
    _mail_host(validating_dns, "ee.signed.test", "127.0.0.2", mx_port, ee_record)
    # DANE-TA: the test CA, which the server sends with its chain.
    ta_context, _ = _with_ca(test_ca, tmp_path, "mx.ta.signed.test")
    ca_hash = _cert_sha256(test_ca.ca_file.read_bytes())
    _mail_host(validating_dns, "ta.signed.test", "127.0.0.3", mx_port, f"2 0 1 {ca_hash}")
    with (
        validating_dns.serving(),
        Sink(mx_port, "127.0.0.2", tls_context=ee_context) as ee,
        Sink(mx_port, "127.0.0.3", tls_context=ta_context) as ta,
    ):
        outcomes = await dane_courier.deliver(
            job(["a@ee.signed.test", "b@ta.signed.test"]), message("dane"), BY_MX
        )
    assert [o.outcome for o in outcomes] == ["delivered", "delivered"], outcomes
    assert [m.tls for m in ee.messages + ta.messages] == [True, True]
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    [ee_policy, _] = dane_courier.tls_reports.report(today)["policies"]
    assert ee_policy["policy"]["policy-type"] == "tlsa"
    assert ee_policy["policy"]["policy-string"] == [ee_record]


async def test_a_tlsa_mismatch_defers_and_never_sends(
    dane_courier: Courier,
    validating_dns: ValidatingDns,
    mx_port: int,
    test_ca: TestCA,
    tmp_path: Path,
) -> None:
    other = test_ca.issue("somewhere.else.test")[0].read_bytes()
    _mail_host(
        validating_dns, "ee.signed.test", "127.0.0.4", mx_port, f"3 1 1 {_spki_sha256(other)}"
    )
    # The CA is the record's TA, but the certificate names another host.
    misnamed, _ = _with_ca(test_ca, tmp_path, "not-the-mx.signed.test")
    ca_hash = _cert_sha256(test_ca.ca_file.read_bytes())
    _mail_host(validating_dns, "ta.signed.test", "127.0.0.5", mx_port, f"2 0 1 {ca_hash}")
    _mail_host(validating_dns, "plain.signed.test", "127.0.0.6", mx_port, NO_SUCH_KEY)
    with (
        validating_dns.serving(),
        Sink(mx_port, "127.0.0.4", tls_context=test_ca.server_context("mx.ee.signed.test")) as ee,
        Sink(mx_port, "127.0.0.5", tls_context=misnamed) as ta,
        Sink(mx_port, "127.0.0.6") as plain,  # no STARTTLS: DANE makes TLS mandatory
    ):
        outcomes = await dane_courier.deliver(
            job(["a@ee.signed.test", "b@ta.signed.test", "c@plain.signed.test"]),
            message("mismatch"),
            BY_MX,
        )
    assert [o.outcome for o in outcomes] == ["deferred"] * 3, outcomes
    assert (
        "4.7.5" in outcomes[0].reply and "no TLSA record of mx.ee.signed.test" in outcomes[0].reply
    )
    assert "no TLSA record of mx.ta.signed.test" in outcomes[1].reply
    assert outcomes[2].reply.startswith("451 4.7.10 mx.plain.signed.test")
    assert ee.messages == ta.messages == plain.messages == []
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    results = {
        p["policy"]["policy-domain"]: p["failure-details"][0]["result-type"]
        for p in dane_courier.tls_reports.report(today)["policies"]
    }
    assert results == {
        "ee.signed.test": "tlsa-invalid",
        "ta.signed.test": "tlsa-invalid",
        "plain.signed.test": "starttls-not-supported",
    }


async def test_tlsa_records_without_a_trusted_ad_bit_are_ignored(
    dane_off_courier: Courier,
    dane_courier: Courier,
    validating_dns: ValidatingDns,
    mx_port: int,
    test_ca: TestCA,
) -> None:
    wrong = NO_SUCH_KEY
    _mail_host(validating_dns, "unsigned.test", "127.0.0.7", mx_port, wrong)
    _mail_host(validating_dns, "nothing.signed.test", "127.0.0.8", mx_port)  # signed, no TLSA
    _mail_host(validating_dns, "ee.signed.test", "127.0.0.9", mx_port, wrong)
    # A signed MX host with a TLSA record, named by the MX record of an unsigned domain.
    validating_dns.add("mixed.unsigned.test", "MX", "10 mx.mixed.signed.test.")
    validating_dns.add("mx.mixed.signed.test", "A", "127.0.0.10")
    validating_dns.add(f"_{mx_port}._tcp.mx.mixed.signed.test", "TLSA", wrong)
    # Secure names, but the TLSA records sit in an unsigned zone below (no DS).
    validating_dns.delegate_unsigned(f"_{mx_port}._tcp.mx.half.signed.test")
    _mail_host(validating_dns, "half.signed.test", "127.0.0.11", mx_port, wrong)
    with (
        validating_dns.serving(),
        Sink(mx_port, "127.0.0.7", tls_context=test_ca.server_context("mx.unsigned.test")),
        Sink(mx_port, "127.0.0.8"),
        Sink(mx_port, "127.0.0.9", tls_context=test_ca.server_context("mx.ee.signed.test")),
        Sink(mx_port, "127.0.0.10", tls_context=test_ca.server_context("mx.mixed.signed.test")),
        Sink(mx_port, "127.0.0.11", tls_context=test_ca.server_context("mx.half.signed.test")),
    ):
        # An unsigned zone's TLSA, a signed zone without any, a host found through an
        # insecure MX record, insecure TLSA records: the route's mode.
        unsigned = await dane_courier.deliver(
            job(
                [
                    "a@unsigned.test",
                    "b@nothing.signed.test",
                    "d@mixed.unsigned.test",
                    "e@half.signed.test",
                ]
            ),
            message("u"),
            BY_MX,
        )
        # --dane off: the AD bit is not trusted, so the wrong record is not looked at.
        untrusted = await dane_off_courier.deliver(job(["c@ee.signed.test"]), message("o"), BY_MX)
    assert [o.outcome for o in unsigned + untrusted] == ["delivered"] * 5


async def test_dane_authenticates_mx_hosts_for_requiretls_without_mta_sts(
    dane_courier: Courier, validating_dns: ValidatingDns, mx_port: int, tmp_path: Path
) -> None:
    context, record = _self_signed(tmp_path, "mx.strict.signed.test")
    _mail_host(validating_dns, "strict.signed.test", "127.0.0.12", mx_port, record)
    with (
        validating_dns.serving(),
        Sink(mx_port, "127.0.0.12", tls_context=context, require_tls=True) as sink,
    ):
        [outcome] = await dane_courier.deliver(
            job(["a@strict.signed.test"], require_tls=True), message("r"), BY_MX
        )
    assert outcome.outcome == "delivered", outcome
    assert [m.mail_parameters.split()[-1] for m in sink.messages] == ["REQUIRETLS"]


async def test_a_tlsa_record_whose_signature_fails_defers_even_when_it_matches(
    dane_courier: Courier, validating_dns: ValidatingDns, mx_port: int, tmp_path: Path
) -> None:
    context, record = _self_signed(tmp_path, "mx.bogus.signed.test")
    _mail_host(validating_dns, "bogus.signed.test", "127.0.0.13", mx_port, NO_SUCH_KEY)
    # Signed as NO_SUCH_KEY, then swapped for the matching record: bogus, and the
    # validator answers SERVFAIL, which must defer (RFC 7672 2.2), not fall back.
    validating_dns.tamper(f"_{mx_port}._tcp.mx.bogus.signed.test", "TLSA", record)
    with (
        validating_dns.serving(),
        Sink(mx_port, "127.0.0.13", tls_context=context) as sink,
    ):
        [outcome] = await dane_courier.deliver(job(["a@bogus.signed.test"]), message("b"), BY_MX)
    assert outcome.outcome == "deferred", outcome
    assert outcome.reply.startswith("451 4.7.5 TLSA lookup of _"), outcome
    assert sink.messages == []
