"""DKIM: the TXT record to publish, and signatures on delivered mail that verify against it.

dkimpy verifies with a dnsfunc that returns the record dkim_txt_record
computed: the public DNS, where the record would really be published, is
out of reach here.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import dkim
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from kurrier.core.dkim_keys import DkimKeyError, dkim_txt_record, signing_key_pem
from kurrier.core.loader import parse_documents
from kurrier.core.routing import CompiledDomain, compile_table
from kurrier.delivery.courier import Courier
from kurrier.delivery.dkim_signer import DkimSigner

from tests.delivery.attempts import job, message, table
from tests.support.relay import documents, route, secret, signing_domain
from tests.support.sink import Sink


def _rsa_pem(bits: int = 2048, pkcs8: bool = False) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    form = (
        serialization.PrivateFormat.PKCS8
        if pkcs8
        else serialization.PrivateFormat.TraditionalOpenSSL
    )
    return key.private_bytes(
        serialization.Encoding.PEM, form, serialization.NoEncryption()
    ).decode()


PKCS1_KEY = _rsa_pem()
PKCS8_KEY = _rsa_pem(pkcs8=True)


def _dns(*records: tuple[str, str]) -> Callable[..., bytes | None]:
    published = {name: value for name, value in records}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        value = published.get(name.decode().rstrip("."))
        return value.encode() if value else None

    return lookup


def _signatures(content: bytes) -> list[bytes]:
    """The DKIM-Signature fields, unfolded."""
    head = content.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    return [line for line in head.split(b"\r\n") if line.lower().startswith(b"dkim-signature:")]


@pytest.mark.parametrize("key", [PKCS1_KEY, PKCS8_KEY], ids=["pkcs1", "pkcs8"])
def test_txt_record_publishes_the_public_key(key: str) -> None:
    name, value = dkim_txt_record(key, "k1", "Example.COM.")
    assert name == "k1._domainkey.example.com"
    assert value.startswith("v=DKIM1; k=rsa; p=MII")
    signed = DkimSigner().sign(
        message("rec"),
        CompiledDomain(
            domain="example.com",
            accept_inbound=False,
            dkim_selector="k1",
            dkim_private_key=key,
        ),
    )
    assert dkim.verify(signed, dnsfunc=_dns((name, value)))


def test_unusable_keys_are_refused_with_a_reason() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(DkimKeyError, match="must be RSA"):
        signing_key_pem(ec_key)
    with pytest.raises(DkimKeyError, match="512 bits"):
        # cryptography refuses to make a key this weak; openssl still will.
        weak = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True)
        signing_key_pem(weak.stdout)
    with pytest.raises(DkimKeyError, match="not a readable"):
        signing_key_pem("-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    # The routing table compiler reports such a key in the RelayDomain's status.
    _, problems = compile_table(
        parse_documents(
            yaml.safe_load_all(
                documents(
                    secret("weak-dkim", **{"private.pem": ec_key.decode()}),
                    signing_domain("weak.test", "k1", "weak-dkim"),
                )
            ),
            "t",
        )
    )
    assert [(p.kind, p.reason) for p in problems] == [("RelayDomain", "SecretInvalid")]
    assert "must be RSA" in problems[0].message


async def test_mail_from_a_signing_domain_arrives_signed_once_and_verifies(
    courier: Courier,
) -> None:
    record = dkim_txt_record(PKCS8_KEY, "2024a", "sender.test")
    with Sink() as sink:
        routes = table(
            secret("signer", **{"private.pem": PKCS8_KEY}),
            signing_domain("sender.test", "2024a", "signer"),
            route("out", ["*"], sink.port),
        )
        sink.behaviour.temp_failures = 1
        [first] = await courier.deliver(job(["r@dest.test"]), message("signed"), routes)
        assert first.outcome == "deferred"
        # The retry signs the stored (unsigned) copy again: still one signature.
        [second] = await courier.deliver(
            job(["r@dest.test"], dispatch=2), message("signed"), routes
        )
        assert second.outcome == "delivered"
        [delivered] = sink.messages
    [signature] = _signatures(delivered.content)
    assert b"d=sender.test;" in signature
    assert b"s=2024a;" in signature
    assert b"c=relaxed/relaxed;" in signature
    assert dkim.verify(delivered.content, dnsfunc=_dns(record))
    # From is listed once more than it occurs, so a second From would break the signature.
    h_tag = b"".join(signature.split(b"h=")[1].split(b";")[0].split())
    assert h_tag.split(b":").count(b"from") == 2
    assert b"received" not in h_tag
    tampered = delivered.content.replace(b"Subject: signed", b"Subject: changed")
    assert not dkim.verify(tampered, dnsfunc=_dns(record))


async def test_mail_from_other_domains_is_not_signed(courier: Courier) -> None:
    with Sink() as sink:
        routes = table(
            secret("signer", **{"private.pem": PKCS1_KEY}),
            signing_domain("sender.test", "k1", "signer"),
            route("out", ["*"], sink.port),
        )
        await courier.deliver(
            job(["r@dest.test"], sender="x@unsigned.test"), message("plain"), routes
        )
        [delivered] = sink.messages
    assert _signatures(delivered.content) == []


def test_a_message_we_signed_already_is_not_signed_again() -> None:
    domain = CompiledDomain(
        domain="sender.test", accept_inbound=False, dkim_selector="k1", dkim_private_key=PKCS1_KEY
    )
    signer = DkimSigner()
    once = signer.sign(message("loop"), domain)
    assert signer.sign(once, domain) == once
    rotated = domain.model_copy(update={"dkim_selector": "k2"})
    assert len(_signatures(signer.sign(once, rotated))) == 2
