"""Domain names as every decision sees them: IDNA 2008 with UTS 46 mapping, as A-labels.

One function, normalise_domain, turns every domain kurrier compares, matches
or sends into one form: UTS 46 non-transitional processing (as Postfix does
with its default `enable_idna2003_compatibility = no`), with the STD3 rules
(letters, digits and hyphens only), the hyphen, bidi and joiner checks and
DNS lengths, then ToASCII. Width and case variants, other scripts' full stops
and ignored characters map to the plain name: `in.test` in full-width
letters, with U+3002 as its dot, or with a U+200B inside is `in.test`. `ß`
stays a letter of its own: `claß.test` is `xn--cla-7ka.test` (IDNA 2003 gave
`class.test`). A name UTS 46 refuses (a symbol, an xn-- label that does not
decode, `_`, `--` in a label's third and fourth place) raises InvalidDomain.

The result is what policy, routing, duplicate detection and the envelope
that goes out all use, so no spelling can reach a decision the others do not
share. A-labels, not U-labels, go out: every next hop takes them, with or
without SMTPUTF8, and the MX lookup needs them anyway.
"""

from __future__ import annotations

import functools

import idna

# Addresses come from clients: a bounded cache keeps repeated names cheap
# without letting a client grow it.
_CACHE_SIZE = 4096


class InvalidDomain(ValueError):
    """A name IDNA 2008 / UTS 46 refuses; the message says which and why."""


@functools.lru_cache(maxsize=_CACHE_SIZE)
def normalise_domain(domain: str) -> str:
    """The lower-case A-label form of domain (without the root's dot), or InvalidDomain."""
    try:
        encoded = idna.encode(domain, uts46=True, std3_rules=True)
    except idna.IDNAError as error:
        # The reason may quote what an xn-- label decodes to: escaped, for a status or a log.
        reason = str(error).encode("ascii", "backslashreplace").decode()
        raise InvalidDomain(f"{domain!r} is not a valid domain name: {reason}") from None
    # After mapping: a full stop of another script can spell the root too.
    return encoded.decode("ascii").removesuffix(".")


def canonical_address(address: str) -> str:
    """address with its domain normalised; the local part is the destination's, kept as given.

    The null sender ('') and a bare local part stay as they are.
    """
    local, at, domain = address.rpartition("@")
    return f"{local}@{normalise_domain(domain)}" if at else address
