"""A real Prometheus (Debian's package, installed by scripts/testbin.sh) scraping the test's
targets, queried through its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.processes import free_port, stop_process, wait_until


class Prometheus:
    """Scrapes targets every second and evaluates rule_files as often."""

    def __init__(self, workdir: Path, targets: Sequence[str], rule_files: Sequence[Path]) -> None:
        self.workdir = workdir
        self.port = free_port()
        self._config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": "kurrier", "static_configs": [{"targets": targets}]}],
        }
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        binary = shutil.which("prometheus")
        assert binary, "prometheus missing: scripts/testbin.sh installs Debian's package"
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self._config))
        log = (self.workdir / "prometheus.log").open("ab")
        self._process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=log,
        )
        wait_until(self._ready, 30, "Prometheus to be ready")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        stop_process(self._process)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **query: str) -> Any:
        """The data of a successful /api/v1 answer."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector expr evaluates to now (each sample's metric and value)."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result
