"""kurrier.core.settings: flags, their KURRIER_* variables, and `kurrier up`'s children."""

from __future__ import annotations

import argparse

import pytest
from kurrier.cli.main import build_parser
from kurrier.cli.up import child_argv
from kurrier.core.settings import (
    PASSED_ON_BY_UP,
    SERVICES,
    Setting,
    command_line,
)

EXAMPLE = __file__


def _up_passes_on(*flags: str) -> dict[str, object]:
    args = build_parser().parse_args(["up", "--config", EXAMPLE, *flags])
    return {setting.name: getattr(args, setting.name) for setting in PASSED_ON_BY_UP}


def _child_args(argv: list[str]) -> argparse.Namespace:
    assert argv[1:3] == ["-m", "kurrier.cli"]
    return build_parser().parse_args(argv[3:])


def test_up_gives_each_child_the_settings_it_has() -> None:
    passed_on = _up_passes_on(
        "--hostname",
        "relay.test",
        "--submission",
        "127.0.0.1:2587",
        "--mx-port",
        "2600",
        "--dns-resolver",
        "127.0.0.1:5353",
        "--tls-ca-file",
        EXAMPLE,
        "--min-backoff",
        "1s",
        "--log-level",
        "DEBUG",
    )
    common = {"nats_url": "nats://127.0.0.1:4333", "nats_replicas": 3, "metrics_listen": "off"}

    delivery = _child_args(child_argv("delivery", passed_on, **common))
    assert (delivery.mx_port, delivery.dns_resolver) == (2600, "127.0.0.1:5353")
    assert (str(delivery.tls_ca_file), delivery.hostname) == (EXAMPLE, "relay.test")
    assert (delivery.nats_url, delivery.nats_replicas, delivery.metrics_listen) == (
        "nats://127.0.0.1:4333",
        3,
        None,
    )

    queue = _child_args(child_argv("queue", passed_on, **common, listen="unix:/q.sock"))
    assert (queue.listen, queue.min_backoff, queue.max_backoff) == ("unix:/q.sock", "1s", "1h")

    ingress = _child_args(child_argv("ingress", passed_on, **common, queue_address="unix:/q"))
    assert (ingress.smtp, ingress.submission, ingress.smtps) == (
        "127.0.0.1:2525",
        "127.0.0.1:2587",
        None,
    )
    assert (ingress.queue_address, ingress.hostname) == ("unix:/q", "relay.test")
    assert {delivery.log_level, queue.log_level, ingress.log_level} == {"DEBUG"}


def test_up_reads_the_variables_of_the_settings_it_passes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KURRIER_MX_PORT", "2600")
    monkeypatch.setenv("KURRIER_SMTP", "127.0.0.1:2626")
    passed_on = _up_passes_on("--smtp", "127.0.0.1:2727")
    assert (passed_on["mx_port"], passed_on["smtp"]) == (2600, "127.0.0.1:2727")


def test_a_value_only_up_decides_must_be_a_setting_of_the_child() -> None:
    with pytest.raises(ValueError, match="not settings of this service: listen"):
        child_argv("delivery", {}, listen="127.0.0.1:7070")


def test_a_value_of_none_is_left_to_the_service_default() -> None:
    settings = (Setting("smtp"), Setting("smtps"), Setting("max_hops", parse=int))
    assert command_line(settings, {"smtp": "[::1]:25", "smtps": None, "max_hops": 7}) == [
        "--smtp",
        "[::1]:25",
        "--max-hops",
        "7",
    ]


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_flag_of_a_service_reads_its_variable(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    text_settings = [s for s in SERVICES[service] if s.parse is str and not s.environment_only]
    for setting in text_settings:
        monkeypatch.setenv(setting.variable, f"from {setting.variable}")
    args = build_parser().parse_args([service])
    for setting in text_settings:
        assert getattr(args, setting.name) == f"from {setting.variable}"


def test_a_variable_overrides_the_default_and_a_flag_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KURRIER_MAX_CONNECTIONS", raising=False)
    assert build_parser().parse_args(["ingress"]).max_connections == 1000
    monkeypatch.setenv("KURRIER_MAX_CONNECTIONS", "20")
    assert build_parser().parse_args(["ingress"]).max_connections == 20
    given = build_parser().parse_args(["ingress", "--max-connections", "30"])
    assert given.max_connections == 30


def test_a_bad_variable_is_a_usage_error_of_the_commands_taking_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KURRIER_MX_PORT", "x")
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(["delivery"])
    assert stopped.value.code == 2
    assert "argument --mx-port: 'x' is not a port" in capsys.readouterr().err
    # A command without the setting does not care.
    assert build_parser().parse_args(["validate", EXAMPLE]).command == "validate"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_a_setting_read_where_it_is_used_has_no_flag(service: str) -> None:
    for setting in (s for s in SERVICES[service] if s.environment_only):
        with pytest.raises(SystemExit):
            build_parser().parse_args([service, setting.flag, "x"])
