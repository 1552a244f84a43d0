"""The per-process limits of SMTP sessions (flags); per-client ones come from RelayPolicy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kurrier.core.durations import parse_duration
from kurrier.core.settings import SESSION_LIMITS, Setting, duration

# Commands that carry no mail get small budgets of their own: enough for any
# honest client, too few to keep a session busy for free.
_CHATTER_BUDGETS = {"NOOP": 50, "HELP": 10, "VRFY": 10, "EXPN": 10, "HELO": 10, "EHLO": 10}


def _value(setting: Setting, value: Any) -> Any:
    """A flag's value as the limits hold it: a duration in seconds."""
    return parse_duration(value) if setting.parse is duration else value


def _declared(name: str) -> Any:
    """The default kurrier.core.settings declares for the flag (KURRIER_* variables are
    the command line's business), so that in-process tests run with the same limits."""
    [setting] = [s for s in SESSION_LIMITS if s.name == name]
    assert isinstance(setting.default, str), setting.name
    return _value(setting, setting.parse(setting.default))


@dataclass(frozen=True)
class SessionLimits:
    max_connections: int = _declared("max_connections")
    # RFC 5321 4.5.3.2.7: the server waits 5 minutes for a command.
    idle_timeout: float = _declared("idle_timeout")
    session_timeout: float = _declared("session_timeout")
    max_commands: int = _declared("max_commands")  # times each command may be given in one session
    max_line_length: int = _declared("max_line_length")
    max_header_size: int = _declared("max_header_size")
    max_headers: int = _declared("max_headers")
    max_hops: int = _declared("max_hops")
    auth_failures_per_minute: int = _declared("auth_failures_per_minute")
    auth_attempts_per_session: int = 3  # not a flag

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> SessionLimits:
        """From the parsed flags of `kurrier ingress`, by setting name."""
        return cls(**{s.name: _value(s, values[s.name]) for s in SESSION_LIMITS})

    def command_budgets(self) -> dict[str, int]:
        """aiosmtpd's command_call_limit: per command, '*' for the rest."""
        budgets = {name: min(n, self.max_commands) for name, n in _CHATTER_BUDGETS.items()}
        return {"*": self.max_commands, "AUTH": self.auth_attempts_per_session, **budgets}
