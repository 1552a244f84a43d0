"""The per-process limits of SMTP sessions (flags); per-client ones come from RelayPolicy."""

from __future__ import annotations

from dataclasses import dataclass

# Commands that carry no mail get small budgets of their own: enough for any
# honest client, too few to keep a session busy for free.
_CHATTER_BUDGETS = {"NOOP": 50, "HELP": 10, "VRFY": 10, "EXPN": 10, "HELO": 10, "EHLO": 10}


@dataclass(frozen=True)
class SessionLimits:
    max_connections: int = 1000
    idle_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: the server waits 5 minutes for a command
    session_timeout: float = 1800.0
    max_commands: int = 1000  # times each command may be given in one session
    max_line_length: int = 1000
    max_header_size: int = 256 * 1024
    max_headers: int = 1000
    max_hops: int = 50
    auth_failures_per_minute: int = 5
    auth_attempts_per_session: int = 3

    def command_budgets(self) -> dict[str, int]:
        """aiosmtpd's command_call_limit: per command, '*' for the rest."""
        budgets = {name: min(n, self.max_commands) for name, n in _CHATTER_BUDGETS.items()}
        return {"*": self.max_commands, "AUTH": self.auth_attempts_per_session, **budgets}
