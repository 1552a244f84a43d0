"""DKIM: the TXT records to publish, and signatures on delivered mail that verify against them.

RSA and Ed25519 keys (RFC 8463), alone or side by side. dkimpy verifies with a
dnsfunc that returns the records dkim_txt_record computed: the public DNS,
where the records would really be published, is out of reach here.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable

import dkim
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from kurrier.core.dkim_keys import DkimKeyError, dkim_txt_record, signing_key
from kurrier.core.loader import parse_documents
from kurrier.core.routing import CompiledDkimKey, CompiledDomain, compile_table
from kurrier.delivery.courier import Courier
from kurrier.delivery.dkim_signer import DkimSigner

from tests.delivery.attempts import job, message, table
from tests.support.certs import ed25519_key, private_pem
from tests.support.relay import documents, multi_key_domain, route, secret, signing_domain
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
ED25519_KEY = private_pem(ed25519_key()).decode()


def _domain(*keys: tuple[str, str]) -> CompiledDomain:
    return CompiledDomain(
        domain="sender.test",
        accept_inbound=False,
        dkim_keys=tuple(CompiledDkimKey(selector=s, private_key=k) for s, k in keys),
    )


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
    signed = DkimSigner().sign(message("rec"), _domain(("k1", key)))
    assert dkim.verify(signed, dnsfunc=_dns(dkim_txt_record(key, "k1", "sender.test")))


def test_ed25519_record_and_signature_follow_rfc_8463() -> None:
    name, value = dkim_txt_record(ED25519_KEY, "ed1", "sender.test")
    assert name == "ed1._domainkey.sender.test"
    # k=ed25519 and the bare 32-octet public key, not a SubjectPublicKeyInfo.
    assert value.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(value.split("p=")[1])) == 32
    signed = DkimSigner().sign(message("ed"), _domain(("ed1", ED25519_KEY)))
    [signature] = _signatures(signed)
    assert b"a=ed25519-sha256;" in signature
    assert dkim.verify(signed, dnsfunc=_dns((name, value)))
    assert not dkim.verify(signed.replace(b"Body of", b"Body if"), dnsfunc=_dns((name, value)))


def test_unusable_keys_are_refused_with_a_reason() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(DkimKeyError, match="must be RSA or Ed25519"):
        signing_key(ec_key)
    with pytest.raises(DkimKeyError, match="512 bits"):
        # cryptography refuses to make a key this weak; openssl still will.
        weak = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True)
        signing_key(weak.stdout)
    with pytest.raises(DkimKeyError, match="not a readable"):
        signing_key("-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
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
    assert "must be RSA or Ed25519" in problems[0].message


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
    domain = _domain(("k1", PKCS1_KEY))
    signer = DkimSigner()
    once = signer.sign(message("loop"), domain)
    assert signer.sign(once, domain) == once
    rotated = _domain(("k2", PKCS1_KEY))
    assert len(_signatures(signer.sign(once, rotated))) == 2
    # Of two keys, only the one that has not signed yet adds a signature.
    assert len(_signatures(signer.sign(once, _domain(("k1", PKCS1_KEY), ("e1", ED25519_KEY))))) == 2


async def test_dual_signed_mail_carries_both_signatures_in_order_and_both_verify(
    courier: Courier,
) -> None:
    records = _dns(
        dkim_txt_record(PKCS8_KEY, "rsa1", "sender.test"),
        dkim_txt_record(ED25519_KEY, "ed1", "sender.test"),
    )
    with Sink() as sink:
        routes = table(
            secret("keys", **{"rsa.pem": PKCS8_KEY, "ed.pem": ED25519_KEY}),
            multi_key_domain("sender.test", "keys", {"rsa1": "rsa.pem", "ed1": "ed.pem"}),
            route("out", ["*"], sink.port),
        )
        [outcome] = await courier.deliver(job(["r@dest.test"]), message("dual"), routes)
        assert outcome.outcome == "delivered"
        [delivered] = sink.messages
    first, second = _signatures(delivered.content)
    assert b"s=rsa1;" in first and b"a=rsa-sha256;" in first
    assert b"s=ed1;" in second and b"a=ed25519-sha256;" in second
    verifier = dkim.DKIM(delivered.content)
    assert [verifier.verify(idx=i, dnsfunc=records) for i in (0, 1)] == [True, True]
    # Each signature stands on its own: with only one key published, only it verifies.
    rsa_only = _dns(dkim_txt_record(PKCS8_KEY, "rsa1", "sender.test"))
    assert [verifier.verify(idx=i, dnsfunc=rsa_only) for i in (0, 1)] == [True, False]


def test_an_unusable_key_beside_a_good_one_is_reported_and_the_good_one_signs() -> None:
    compiled, problems = compile_table(
        parse_documents(
            yaml.safe_load_all(
                documents(
                    secret("keys", **{"ed.pem": ED25519_KEY, "bad.pem": "not a key"}),
                    multi_key_domain("sender.test", "keys", {"bad": "bad.pem", "ed1": "ed.pem"}),
                )
            ),
            "t",
        )
    )
    assert [(p.reason, p.message) for p in problems] == [
        ("SecretInvalid", "DKIM Secret 'keys' has no PEM private key under 'bad.pem'")
    ]
    domain = compiled.domain("sender.test")
    assert domain is not None
    assert [key.selector for key in domain.dkim_keys] == ["ed1"]
