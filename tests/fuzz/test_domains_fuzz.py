"""The one domain normalisation (core/domains.py): any text is refused or becomes a
name that every later decision, normalising it again, sees unchanged."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from kurrier.core.domains import InvalidDomain, canonical_address, normalise_domain

_LDH_NAME = re.compile(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)

# ASCII letters and separators, the dots and width variants UTS 46 maps, ignored and
# joiner characters, combining marks, and any other character.
_PIECES = st.one_of(
    st.sampled_from(
        [
            *"aAzZ09-.",
            "xn--",
            "\u3002",
            "\uff0e",
            "\uff61",
            "\u200b",
            "\u200c",
            "\u200d",
            "\u00ad",
            "\ufeff",
            "\u00df",
            "\u0301",
            "\uff21",
            "\u2488",
            "\u0660",
            "\u05d0",
            "@",
        ]
    ),
    st.characters(codec="utf-8"),
)
DOMAIN = st.lists(_PIECES, max_size=40).map("".join)


@given(DOMAIN)
def test_a_domain_is_refused_or_normalised_for_good(text: str) -> None:
    try:
        name = normalise_domain(text)
    except InvalidDomain:
        return
    assert _LDH_NAME.match(name) and len(name) <= 253, (text, name)
    assert normalise_domain(name) == name, (text, name)
    assert canonical_address(f"u@{text}") == f"u@{name}"
