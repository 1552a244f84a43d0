"""The kurrier command as users meet it: usage errors, validate, and the sink."""

from __future__ import annotations

import json
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import free_port, kurrier_argv, smtp_banner, stop_process, wait_until

EXAMPLE = Path(__file__).parents[2] / "examples" / "local.yaml"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kurrier_argv(*args), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("up", "--config", str(EXAMPLE), "--bogus"), "unrecognized arguments: --bogus"),
        (("up", "--config", "/nonexistent.yaml"), "/nonexistent.yaml: no such file"),
        (
            ("up", "--config", str(EXAMPLE), "--nats-sync", "sometimes"),
            "'sometimes' is not 'always' or a duration",
        ),
        (("validate", "/nonexistent.yaml"), "/nonexistent.yaml: no such file"),
        (("queue", "--min-backoff", "soon"), "'soon' is not a duration"),
        (
            ("queue", "--min-backoff", "2h"),
            "--min-backoff 2h is longer than --max-backoff 1h",
        ),
        (
            ("up", "--config", str(EXAMPLE), "--min-backoff", "10s", "--max-backoff", "5s"),
            "--min-backoff 10s is longer than --max-backoff 5s",
        ),
        (("ingress", "--smtp", "localhost"), "'localhost' is not HOST:PORT"),
        (("launch",), "invalid choice: 'launch'"),
        ((), "the following arguments are required: command"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args: tuple[str, ...], message: str) -> None:
    result = _run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_accepts_the_example() -> None:
    result = _run("validate", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{EXAMPLE}: 3 resources, 0 problems"


def test_validate_names_document_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("port: 2526", "port: 99999"))
    result = _run("validate", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{bad}: document 2 (RelayRoute 'to-local-sink'): spec.destination.smarthost.port: "
        "Input should be less than or equal to 65535"
    )


def test_validate_reports_missing_secrets(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        EXAMPLE.read_text().replace(
            "  maxConnections: 10", "  maxConnections: 10\n  auth: {secretRef: {name: gone}}"
        )
    )
    result = _run("validate", str(config))
    assert result.returncode == 1
    assert "RelayRoute 'to-local-sink': auth Secret 'gone' not found" in result.stderr


def test_sink_files_each_message_with_its_envelope(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        kurrier_argv("sink", "--listen", f"127.0.0.1:{port}", "--dir", str(tmp_path / "mail")),
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: smtp_banner(port), 30, "the sink to listen")
        message = b"Subject: filed\r\n\r\n.dot\r\nbody\r\n"
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("a@b.test", ["c@d.test", "e@f.test"], message)
    finally:
        assert stop_process(process) == 0
    [eml] = (tmp_path / "mail").glob("*.eml")
    assert eml.read_bytes() == message
    envelope = json.loads(eml.with_suffix(".json").read_text())
    assert envelope["mail_from"] == "a@b.test"
    assert envelope["rcpt_tos"] == ["c@d.test", "e@f.test"]
