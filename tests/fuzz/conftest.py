"""Hypothesis profiles: 'ci' (bounded, the default) and 'long' (run by hand).

HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/fuzz -p no:cacheprovider --timeout 0

(A long run of one test outlasts the suite's 300 s per test.)
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "long", max_examples=200_000, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
