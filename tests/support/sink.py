"""A programmable SMTP sink standing in for the next hop: real aiosmtpd on a real socket.

It runs in its own thread (aiosmtpd's Controller), records every message, and
can be told to misbehave: answer 451 a number of times, refuse chosen
recipients, or drop the connection in the middle of DATA. It also tracks how
many connections are open at once. Given a TLS context it offers STARTTLS;
given users it offers AUTH (PLAIN and LOGIN) and records who logged in; with
chunking it offers PIPELINING and CHUNKING and takes BDAT (RFC 3030), which
aiosmtpd lacks; with dsn it offers DSN and takes its parameters (RFC 3461).
EHLO keywords named in `without` (8BITMIME, SMTPUTF8) are not offered, as
by an older next hop. It records the parameters of MAIL and of each RCPT.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.support.processes import free_port


@dataclass(frozen=True)
class Received:
    mail_from: str
    recipients: tuple[str, ...]
    content: bytes
    connection: int
    tls: bool = False
    auth_user: str = ""
    chunked: bool = False  # came by BDAT, not DATA
    mail_options: tuple[str, ...] = ()  # MAIL FROM parameters: BODY=8BITMIME, SMTPUTF8
    # The parameters of MAIL FROM, and of each RCPT TO (in recipients' order), as sent.
    mail_parameters: str = ""
    rcpt_parameters: tuple[str, ...] = ()


@dataclass
class Behaviour:
    temp_failures: int = 0
    temp_failure_reply: str = "451 4.3.0 try again later"
    rejected: dict[str, str] = field(default_factory=dict)
    drops_mid_data: int = 0
    # Seconds each DATA takes to answer: a slow next hop, so work is in flight.
    data_delay: float = 0.0
    # Each DATA is answered only once this is set: a next hop holding its
    # transactions open for as long as a test needs (Sink.transactions_held).
    data_gate: threading.Event | None = None
    # A next hop in trouble until told otherwise: every transaction gets
    # outage_reply at this phase ("greeting", "MAIL", "RCPT" or "DATA").
    outage_phase: str | None = None
    outage_reply: str = "451 4.3.0 try again later"


class _SinkEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.mail_parameters = ""
        self.rcpt_parameters: list[str] = []


class _CountingSMTP(SMTP):
    def __init__(self, sink: Sink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink
        self.connection_number = 0
        self.chunks: list[bytes] = []
        self.chunked = False
        # The parameters of the MAIL or RCPT being handled, as sent.
        self.parameters = ""

    def _create_envelope(self) -> _SinkEnvelope:
        return _SinkEnvelope()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connection_number = self._sink.connection_opened()
        super().connection_made(transport)

    async def _handle_client(self) -> None:
        reply = self._sink.outage_reply("greeting")
        if reply is None:
            await super()._handle_client()
            return
        await self.push(reply)
        assert self.transport is not None
        self.transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        self._sink.connection_closed()
        super().connection_lost(error)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        address, parameters = super()._getaddr(arg)
        self.parameters = parameters or ""
        return address, parameters

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        # aiosmtpd refuses every parameter it does not know (555).
        known = super()._getparams(params)
        if known is None:
            return known
        taken: tuple[str, ...] = ("RET", "ENVID", "NOTIFY", "ORCPT") if self._sink.dsn else ()
        taken += ("REQUIRETLS",) if self._sink.require_tls else ()
        return {k: v for k, v in known.items() if k not in taken}

    async def smtp_BDAT(self, arg: str) -> None:
        words = arg.split()
        if not self._sink.chunking:
            await self.push("500 5.5.1 Command not recognized")
            return
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or words[1:] not in ([], ["LAST"]):
            await self.push("501 5.5.4 Syntax: BDAT size [LAST]")
            return
        # The chunk is read whatever the state, so the session stays in step.
        chunk = await self._reader.readexactly(int(words[0]))
        envelope = self.envelope
        if envelope is None or not envelope.mail_from or not envelope.rcpt_tos:
            self.chunks.clear()
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        self.chunks.append(chunk)
        if len(words) == 1:
            await self.push(f"250 2.0.0 {len(chunk)} octets received")
            return
        content = b"".join(self.chunks)
        self.chunks.clear()
        envelope.content = envelope.original_content = content
        self.chunked = True
        status = await self._call_handler_hook("DATA")
        self.chunked = False
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        responses = [r for r in responses if r[4:].split(" ")[0] not in self._sink.without]
        offered = ["250-PIPELINING", "250-CHUNKING"] if self._sink.chunking else []
        offered += ["250-DSN"] if self._sink.dsn else []
        # RFC 8689 3: offered only once the session is TLS.
        offered += ["250-REQUIRETLS"] if self._sink.require_tls and session.ssl else []
        return [*responses[:-1], *offered, responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._sink.outage_reply("MAIL")
        if reply:
            return reply
        # A next hop shutting down answers 421 at the greeting, and closes the
        # sessions already open at their next command.
        reply = self._sink.outage_reply("greeting")
        if reply and server.transport is not None:
            asyncio.get_running_loop().call_soon(server.transport.close)
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        if isinstance(envelope, _SinkEnvelope) and isinstance(server, _CountingSMTP):
            envelope.mail_parameters = server.parameters
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._sink.outage_reply("RCPT") or self._sink.behaviour.rejected.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        if isinstance(envelope, _SinkEnvelope) and isinstance(server, _CountingSMTP):
            envelope.rcpt_parameters.append(server.parameters)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self._sink.behaviour.data_gate is not None:
            await self._sink.hold(self._sink.behaviour.data_gate)
        if self._sink.behaviour.data_delay:
            await asyncio.sleep(self._sink.behaviour.data_delay)
        return self._sink.take(server, envelope)


class Sink:
    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        tls_context: ssl.SSLContext | None = None,
        users: dict[str, str] | None = None,
        auth_over_plaintext: bool = False,
        auth_exclude: tuple[str, ...] = (),
        chunking: bool = False,
        without: tuple[str, ...] = (),
        dsn: bool = False,
        require_tls: bool = False,
    ) -> None:
        self.host = host
        self.chunking = chunking
        self.without = without
        self.dsn = dsn
        self.require_tls = require_tls
        self.port = port or free_port()
        self.behaviour = Behaviour()
        self.messages: list[Received] = []
        # (mechanism, login, whether TLS was on) of every AUTH the sink was sent.
        self.auth_attempts: list[tuple[str, str, bool]] = []
        self.connections_total = 0
        self.connections_open = 0
        # Replies given at the phase of an outage (Behaviour.outage_phase).
        self.outage_replies = 0
        # DATA commands that came to Behaviour.data_gate.
        self.transactions_held = 0
        self.max_connections_open = 0
        self._changed = threading.Condition()
        sink = self

        class _Controller(Controller):
            def factory(self) -> SMTP:
                return _CountingSMTP(
                    sink,
                    self.handler,
                    hostname="sink.test",
                    decode_data=False,
                    enable_SMTPUTF8=True,
                    data_size_limit=None,
                    tls_context=tls_context,
                    authenticator=sink._authenticator(users) if users is not None else None,
                    auth_require_tls=not auth_over_plaintext,
                    auth_exclude_mechanism=auth_exclude,
                )

        self._controller = _Controller(_Handler(self), hostname=host, port=self.port)

    def __enter__(self) -> Sink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    def _authenticator(self, users: dict[str, str]) -> Any:
        def authenticate(
            server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
        ) -> AuthResult:
            if not isinstance(data, LoginPassword):
                return AuthResult(success=False, handled=False)
            login, password = data.login.decode(), data.password.decode()
            with self._changed:
                self.auth_attempts.append((mechanism, login, session.ssl is not None))
            success = users.get(login) == password
            return AuthResult(success=success, handled=False, auth_data=login if success else None)

        return authenticate

    def connection_opened(self) -> int:
        with self._changed:
            self.connections_total += 1
            self.connections_open += 1
            self.max_connections_open = max(self.max_connections_open, self.connections_open)
            return self.connections_total

    def connection_closed(self) -> None:
        with self._changed:
            self.connections_open -= 1
            self._changed.notify_all()

    async def hold(self, gate: threading.Event) -> None:
        with self._changed:
            self.transactions_held += 1
        await asyncio.to_thread(gate.wait)  # off the loop: other sessions go on

    def outage_reply(self, phase: str) -> str | None:
        """The reply to give at this phase while the next hop is in trouble, else None."""
        with self._changed:
            if self.behaviour.outage_phase != phase:
                return None
            self.outage_replies += 1
            return self.behaviour.outage_reply

    def take(self, server: SMTP, envelope: Envelope) -> str:
        reply = self.outage_reply("DATA")
        if reply:
            return reply
        with self._changed:
            behaviour = self.behaviour
            if behaviour.drops_mid_data > 0:
                behaviour.drops_mid_data -= 1
                if isinstance(server.transport, asyncio.Transport):
                    server.transport.abort()
                return "421 4.4.2 connection dropped"
            if behaviour.temp_failures > 0:
                behaviour.temp_failures -= 1
                return behaviour.temp_failure_reply
            assert isinstance(envelope.original_content, bytes)
            parameters = envelope if isinstance(envelope, _SinkEnvelope) else _SinkEnvelope()
            connection = server.connection_number if isinstance(server, _CountingSMTP) else 0
            assert server.session is not None
            self.messages.append(
                Received(
                    mail_from=envelope.mail_from or "",
                    recipients=tuple(envelope.rcpt_tos),
                    content=envelope.original_content,
                    connection=connection,
                    tls=server.session.ssl is not None,
                    auth_user=str(server.session.auth_data or ""),
                    chunked=isinstance(server, _CountingSMTP) and server.chunked,
                    mail_options=tuple(envelope.mail_options),
                    mail_parameters=parameters.mail_parameters,
                    rcpt_parameters=tuple(parameters.rcpt_parameters),
                )
            )
            self._changed.notify_all()
        return "250 2.0.0 Ok: sunk"

    def wait_for(self, count: int, timeout: float = 60) -> list[Received]:
        """Block until at least count messages arrived; fail the test otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"sink got {len(self.messages)} of {count} messages in {timeout}s"
                    )
                self._changed.wait(remaining)
            return list(self.messages)
