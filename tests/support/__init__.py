"""Helpers the tests share: processes, NATS, sinks, certificates, a test API server, the chart.

``REPO`` is the root of this checkout.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
