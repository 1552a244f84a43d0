"""Optimisation experiments on kurrier's services, without editing them.

With this folder first on PYTHONPATH, every Python process of `kurrier up`
imports this module at start-up and applies the experiments named in
KURRIER_BENCH_EXPERIMENTS (comma separated). `python -m bench.run --systems
kurrier,kurrier+uvloop,...` sets both, so an idea's gain is measured before
it lands in the services. These are prototypes for measurement, not production code.
"""

from __future__ import annotations

import importlib
import os

_CHOSEN = {name for name in os.environ.get("KURRIER_BENCH_EXPERIMENTS", "").split(",") if name}

if "uvloop" in _CHOSEN:
    importlib.import_module("uvloop").install()
