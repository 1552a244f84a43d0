"""The delivery flags of `kurrier delivery` and `kurrier up`, and their KURRIER_* variables."""

from __future__ import annotations

import pytest
from kurrier.cli.main import build_parser


def test_delivery_takes_resolver_and_mx_port(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        ["delivery", "--dns-resolver", "[::1]:53", "--mx-port", "2525"]
    )
    assert (args.dns_resolver, args.mx_port) == ("[::1]:53", 2525)
    assert build_parser().parse_args(["delivery"]).mx_port == 25
    monkeypatch.setenv("KURRIER_MX_PORT", "2600")
    monkeypatch.setenv("KURRIER_DNS_RESOLVER", "127.0.0.1:5353")
    args = build_parser().parse_args(["delivery"])
    assert (args.dns_resolver, args.mx_port) == ("127.0.0.1:5353", 2600)


@pytest.mark.parametrize(
    "argv",
    [
        ["delivery", "--mx-port", "0"],
        ["delivery", "--mx-port", "70000"],
        ["delivery", "--dns-resolver", "no-port"],
        ["up", "--config", __file__, "--mx-port", "x"],
    ],
)
def test_bad_values_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args(argv)
    assert stopped.value.code == 2
    assert "error:" in capsys.readouterr().err
