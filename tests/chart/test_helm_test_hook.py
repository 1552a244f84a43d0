"""The `helm test` hook's mail-sending script, run for real against an SMTP sink."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support.chart import Scenario, by_kind, env_of, render
from tests.support.kube import Obj
from tests.support.processes import free_port
from tests.support.sink import Sink


def hook_pod(helm_bin: Path, tmp_path: Path, values: dict[str, object] | None = None) -> Obj:
    pods = by_kind(render(helm_bin, Scenario("hook", values or {}), tmp_path), "Pod")
    assert len(pods) == 1
    return pods[0]


def run_hook(pod: Obj, port: int, timeout_seconds: int = 30) -> subprocess.CompletedProcess[str]:
    """Run the Pod's container command locally, pointed at 127.0.0.1:port."""
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["python", "-c"]
    env = {**os.environ, **env_of(c)}
    env.update(SMTP_HOST="127.0.0.1", SMTP_PORT=str(port), TIMEOUT_SECONDS=str(timeout_seconds))
    return subprocess.run(
        [sys.executable, "-c", c["args"][0]],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_seconds + 30,
        check=False,
    )


def test_hook_is_a_helm_test_pod_aimed_at_the_ingress_service(
    helm_bin: Path, tmp_path: Path
) -> None:
    pod = hook_pod(helm_bin, tmp_path, {"tests": {"recipient": "ops@mail.example.org"}})
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    env = env_of(pod["spec"]["containers"][0])
    assert env["SMTP_HOST"] == "kurrier-ingress.kurrier-hook.svc"
    assert env["SMTP_PORT"] == "25"
    assert env["RCPT_TO"] == "ops@mail.example.org"
    assert env["IMPLICIT_TLS"] == "false"


def test_hook_sends_one_mail(helm_bin: Path, sink: Sink, tmp_path: Path) -> None:
    proc = run_hook(hook_pod(helm_bin, tmp_path), sink.port)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK:" in proc.stdout
    [message] = sink.wait_for(1)
    assert message.mail_from == "helm-test@example.com"
    assert message.recipients == ("postmaster@example.com",)
    assert b"Subject: kurrier helm test" in message.content


def test_hook_retries_temporary_failures(helm_bin: Path, sink: Sink, tmp_path: Path) -> None:
    sink.behaviour.temp_failures = 1
    proc = run_hook(hook_pod(helm_bin, tmp_path), sink.port)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "not yet: 451" in proc.stdout
    assert len(sink.wait_for(1)) == 1


def test_hook_fails_fast_and_explains_a_refusal(helm_bin: Path, sink: Sink, tmp_path: Path) -> None:
    sink.behaviour.rejected["postmaster@example.com"] = "554 5.7.1 Relay access denied"
    started = time.monotonic()
    proc = run_hook(hook_pod(helm_bin, tmp_path), sink.port, timeout_seconds=60)
    assert proc.returncode != 0
    assert time.monotonic() - started < 30, "a permanent refusal must not be retried"
    assert "FAIL:" in proc.stderr and "554 5.7.1 Relay access denied" in proc.stderr
    assert "tests.recipient" in proc.stderr
    assert sink.messages == []


def test_hook_gives_up_when_nothing_listens(helm_bin: Path, tmp_path: Path) -> None:
    proc = run_hook(hook_pod(helm_bin, tmp_path), free_port(), timeout_seconds=3)
    assert proc.returncode != 0
    assert "FAIL: no mail accepted" in proc.stderr
