"""One SMTP connection: aiosmtpd's protocol machine plus the hardening it has no hooks for.

Policy stays in the handler (handler.py). This subclass only adds what
aiosmtpd offers no option or hook for, each override saying why: admission
(connection limits, drain) before the greeting, a session time limit, a
bounded DATA reader, the strict RFC 5321 path parser, command lines that end
in CRLF only, "<postmaster>" as a recipient, replies without the client's
control bytes and with enhanced status codes, replies to pipelined commands
written together, closing the connection after every 421, and BDAT
(RFC 3030 CHUNKING), which aiosmtpd does not have.

STARTTLS is aiosmtpd's own and already right: when the handshake completes it
clears every byte the client pipelined after STARTTLS (CVE-2011-0411) and
starts a new session, so EHLO, AUTH and MAIL must all be given again
(RFC 3207 4.2). tests/ingress prove both on a raw socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import ssl
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from aiosmtpd.smtp import MISSING, SMTP, Envelope, _Missing, syntax
from kurrier.core.cluster_counters import ClusterLeases
from kurrier.core.dsn_parameters import (
    DSN_KEYWORDS,
    MAIL_LINE_GROWTH,
    RCPT_LINE_GROWTH,
    MailParameters,
    RcptParameters,
    split_parameters,
)
from kurrier.core.metrics import rejected
from kurrier.core.table_store import TableFollower
from kurrier.ingress import require_tls
from kurrier.ingress.command_lines import (
    BARE_NEWLINE,
    BARE_NEWLINE_COMMAND,
    BareNewline,
    CommandLineProtocol,
)
from kurrier.ingress.connection_gate import SHUTTING_DOWN, ConnectionGate
from kurrier.ingress.data_reader import DataLimits, DataReader
from kurrier.ingress.data_stream import read_data
from kurrier.ingress.pipelined_replies import PipelinedReplies
from kurrier.ingress.session_limits import SessionLimits
from kurrier.ingress.smtp_path import parse_path
from kurrier.ingress.smtp_replies import safe_reply, with_enhanced_code

log = logging.getLogger(__name__)

# aiosmtpd takes an empty address for a syntax error, so the null reverse-path
# "<>" travels through it as this marker (handler.sender_of turns it back).
NULL_PATH = "<>"
# RFC 4954 4: an AUTH line with its initial response may be 12288 octets.
AUTH_LINE_LIMIT = 12288
# RFC 1870 6: SIZE (which the handler offers, not aiosmtpd) adds 26 to MAIL's
# line; aiosmtpd adds SMTPUTF8's 10 (RFC 6531 3.4) itself at EHLO.
SIZE_PARAMETER = 26
# RFC 5321 4.1.1.3: "RCPT TO:<Postmaster>", no domain, is this server's postmaster.
_POSTMASTER = re.compile(r"^(TO:\s*)<postmaster>(?=\s|$)", re.IGNORECASE)
# RFC 3030 2: "BDAT" SP chunk-size [SP end-marker]; 20 digits hold any size a client means.
_BDAT_ARGUMENT = re.compile(r"([0-9]{1,20})(?: +(LAST))?", re.IGNORECASE)
BDAT_SYNTAX = "501 5.5.4 Syntax: BDAT <size> [LAST]"
BDAT_LOST_TRACK = "421 4.5.0 BDAT without a readable size: the chunk's end is unknown, closing"
DATA_AFTER_BDAT = "503 5.5.1 Error: DATA after BDAT in one transaction, send RSET"
RCPT_AFTER_BDAT = "503 5.5.1 Error: RCPT after BDAT"
IDLE_TIMEOUT = "421 4.4.2 Idle timeout, closing connection"
SESSION_TIMEOUT = "421 4.4.2 Session time limit reached, closing connection"


def writable(transport: asyncio.BaseTransport) -> asyncio.WriteTransport:
    """A TCP transport as the writer it is. Not isinstance(): uvloop's transports
    (the services run on uvloop) are not registered with asyncio's ABCs."""
    return cast(asyncio.WriteTransport, transport)


@dataclass(frozen=True)
class Listener:
    name: str  # smtp, submission, smtps
    implicit_tls: bool = False
    offers_auth: bool = False


class Sessions:
    """What every session of this process shares: limits, admission, and the live set."""

    def __init__(
        self, limits: SessionLimits, tables: TableFollower, clients: ClusterLeases
    ) -> None:
        """clients: the connections of each client, counted across all replicas."""
        self.limits = limits
        self.tables = tables
        self.gate = ConnectionGate(limits.max_connections, clients)
        self.live: weakref.WeakSet[IngressSMTP] = weakref.WeakSet()

    def drain(self) -> None:
        """New connections get 421 from now on; idle sessions are told so and closed."""
        self.gate.draining = True
        for session in list(self.live):
            session.drain()


class RelayEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        # relay_policy.recipient_key of each of rcpt_tos: a duplicate RCPT is not added.
        self.recipient_keys: set[tuple[str, str]] = set()
        # The DSN parameters (RFC 3461) of MAIL, and of the recipients that gave any.
        self.dsn = MailParameters()
        self.recipient_dsn: dict[str, RcptParameters] = {}
        # The client gave REQUIRETLS (RFC 8689) on MAIL FROM.
        self.require_tls = False
        # The message so far once a BDAT chunk came; a new envelope (RSET, the
        # end of the transaction) discards it.
        self.chunks: DataReader | None = None
        # The namespace whose resources govern this message (core/tenancy.py):
        # known at MAIL for an identified client, else from the first recipient.
        self.tenant: str | None = None


class IngressSMTP(SMTP, CommandLineProtocol):
    # The StreamReader's limit: how much of one line (or DATA chunk) is held at
    # once. aiosmtpd still cuts commands at 512 octets and the CRLF (RFC 5321
    # 4.5.3.1.4 asks for at least 512 with the CRLF), AUTH at 12288.
    line_length_limit = 64 * 1024

    def __init__(
        self,
        handler: Any,
        *,
        listener: Listener,
        sessions: Sessions,
        hostname: str,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        limits = sessions.limits
        super().__init__(
            handler,
            hostname=hostname,
            ident="kurrier",
            decode_data=False,
            enable_SMTPUTF8=True,
            # The handler advertises and checks SIZE from the live policy, with enhanced codes.
            data_size_limit=None,
            # STARTTLS only where the connection is not TLS from the start.
            tls_context=None if listener.implicit_tls else tls_context,
            timeout=limits.idle_timeout,
            # The handler enforces requireTLSForAuth itself: aiosmtpd's check does
            # not know a connection that was TLS from the first byte (port 465).
            auth_require_tls=False,
            command_call_limit=limits.command_budgets(),
        )
        # aiosmtpd keeps command size limits in one class-wide dict that every EHLO
        # grows; each session gets its own, with room for AUTH, for SIZE and
        # REQUIRETLS on MAIL and for the DSN parameters on MAIL and RCPT.
        self.command_size_limits = collections.defaultdict(
            lambda: self.command_size_limit,
            {
                "AUTH": AUTH_LINE_LIMIT,
                "MAIL": self.command_size_limit
                + SIZE_PARAMETER
                + MAIL_LINE_GROWTH
                + require_tls.LINE_GROWTH,
                "RCPT": self.command_size_limit + RCPT_LINE_GROWTH,
            },
        )
        # The DSN parameters of the MAIL or RCPT being handled, as sent: taken out
        # before aiosmtpd upper-cases the line (ENVID and ORCPT are case-sensitive)
        # and refuses parameters it does not know. The handler checks them.
        self.dsn_given: list[tuple[str, str | None]] = []
        # REQUIRETLS (RFC 8689) as given with that command, taken out alike.
        self.require_tls_given: list[tuple[str, str | None]] = []
        # A line with a bare CR or LF reaches aiosmtpd as this command (command_lines.py).
        self._smtp_methods[BARE_NEWLINE_COMMAND] = self._refuse_bare_newline
        self.listener = listener
        self._sessions = sessions
        self._peer_ip = ""
        self._admitted = False
        self._refused = False
        # The client's slot among its connections to all replicas: None when no
        # per-client limit applies; its result is None when admitted, else the 421.
        self._client_slot: asyncio.Task[str | None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._replies: PipelinedReplies | None = None
        self._content_coming = False

    # -- admission and time limits -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:  # STARTTLS: the same client, now encrypted
            super().connection_made(transport)
            return
        # aiosmtpd greets every connection; admission must happen before that.
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else ""
        refusal = self._sessions.gate.admit()
        if refusal is not None:
            self._refused = True
            log.info("connection from %s refused: %s", ip, refusal)
            writable(transport).write(refusal.encode() + b"\r\n")
            transport.close()
            return
        self._peer_ip, self._admitted = ip, True
        table = self._sessions.tables.table
        if table.limits_client(ip):
            # Asks NATS: _handle_client waits for the answer before the greeting.
            self._client_slot = asyncio.get_running_loop().create_task(
                self._sessions.gate.admit_client(ip, table.policy.max_connections_per_client)
            )
        self._sessions.live.add(self)
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and self.session is not None:
            # Implicit TLS: aiosmtpd records TLS only when it did the STARTTLS itself.
            self.session.ssl = {"ssl_object": ssl_object, "cipher": ssl_object.cipher()}
        self._deadline = self.loop.call_later(
            self._sessions.limits.session_timeout, self.say_goodbye, SESSION_TIMEOUT
        )

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return  # never admitted: aiosmtpd has nothing to clean up
        if self._admitted:  # aiosmtpd may call this twice after a failed STARTTLS
            self._sessions.gate.release()
            self._sessions.live.discard(self)
            self._admitted = False
            if self._client_slot is not None:
                self._client_slot.add_done_callback(self._release_client_slot)
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        # aiosmtpd's session loop starts with the greeting: a client over its
        # connections across replicas hears the 421 instead.
        if self._client_slot is not None:
            refusal = await asyncio.shield(self._client_slot)
            if refusal is not None:
                log.info("connection from %s refused: %s", self._peer_ip, refusal)
                self.say_goodbye(refusal)
                return
        await super()._handle_client()

    def _release_client_slot(self, slot: asyncio.Task[str | None]) -> None:
        if not slot.cancelled() and slot.exception() is None and slot.result() is None:
            self._sessions.gate.release_client(self._peer_ip)

    def _timeout_cb(self) -> None:
        # aiosmtpd closes an idle connection without a word; RFC 5321 4.2 wants a 421.
        self.say_goodbye(IDLE_TIMEOUT)

    def say_goodbye(self, reply: str) -> None:
        """Send reply (a 421) and close, whatever the session is doing."""
        if self.transport is not None and not self.transport.is_closing():
            # Replies held for a pipeline go first: one may be a message's 250.
            held = self._replies.take_held() if self._replies is not None else b""
            writable(self.transport).write(held + reply.encode() + b"\r\n")
            self.transport.close()

    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def drain(self) -> None:
        if not self.in_transaction():
            self.say_goodbye(SHUTTING_DOWN)

    # -- replies ----------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if self._replies is None:
            # The reader and writer outlive STARTTLS (aiosmtpd swaps their transport).
            self._replies = PipelinedReplies(self._reader, self._writer)
        if isinstance(status, bytes):  # AUTH challenges
            await self._replies.send(status)
            return
        status = with_enhanced_code(safe_reply(status))
        if status[:1] in ("4", "5"):
            rejected(status)
        await self._replies.send(status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii"))
        if status.startswith("421"):
            # 421 means the server closes the channel (RFC 5321 4.2.2); aiosmtpd does not.
            if self.transport is not None:
                self.transport.close()
        elif self._sessions.gate.draining and _final(status) and not self.in_transaction():
            # Draining: a session that just finished its transaction is told at once.
            self.say_goodbye(SHUTTING_DOWN)

    async def smtp_STARTTLS(self, arg: str) -> None:
        # aiosmtpd would start TLS inside TLS; RFC 3207 4.2 allows one TLS per session.
        if self.session is not None and self.session.ssl is not None:
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        # aiosmtpd splits the argument on any Unicode whitespace and takes the first
        # word: an argument of only such characters (U+0085, found by the fuzzer)
        # raised IndexError and answered with the exception's text.
        if arg and not arg.split():
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        await super().smtp_AUTH(arg)

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> _Missing | bytes:
        # The answer to a 334 is a line like any command's (command_lines.py).
        try:
            return await super().challenge_auth(challenge, encode_to_b64, log_client_response)
        except BareNewline as refused:
            await self._refuse_bare_newline(refused.kind)
            return MISSING

    async def _refuse_bare_newline(self, kind: str) -> None:
        await self.push(BARE_NEWLINE.format(kind=kind))

    # -- MAIL/RCPT paths --------------------------------------------------------------

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        # RFC 5321 4.1.1.3 and 4.5.1: "<Postmaster>" without a domain is the
        # postmaster of this server, here of its hostname (the routes decide
        # where that goes). Not a mailbox, so the path parser refuses it.
        if arg is not None:
            own = f"<postmaster@{self.hostname}>"
            arg = _POSTMASTER.sub(lambda found: found[1] + own, arg, count=1)
        if isinstance(self.envelope, RelayEnvelope) and self.envelope.chunks is not None:
            await self.push(RCPT_AFTER_BDAT)
            return
        await super().smtp_RCPT(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses paths with the e-mail header parser (comments, spaces
        # around '@'); SMTP's grammar is stricter.
        parsed = parse_path(arg)
        if parsed is None:
            return None, None
        mailbox, parameters = parsed
        parameters, self.dsn_given = split_parameters(parameters, DSN_KEYWORDS)
        parameters, self.require_tls_given = split_parameters(parameters, (require_tls.KEYWORD,))
        return mailbox or NULL_PATH, parameters

    # -- DATA -------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's DATA loop keeps every fragment of an endless line in memory;
        # this one reads through DataReader, which never holds more than the limit.
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if isinstance(self.envelope, RelayEnvelope) and self.envelope.chunks is not None:
            await self.push(DATA_AFTER_BDAT)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader = self._message_reader()
        with self._taking_content():
            if not await read_data(self._reader, reader):
                return  # the client went away; nothing was accepted
        await self._end_message(reader)

    def _message_reader(self) -> DataReader:
        limits = self._sessions.limits
        return DataReader(
            DataLimits(
                max_size=self._sessions.tables.table.policy.max_message_size,
                max_line_length=limits.max_line_length,
                max_header_size=limits.max_header_size,
                max_headers=limits.max_headers,
                max_hops=limits.max_hops,
            )
        )

    async def _end_message(self, reader: DataReader) -> None:
        """The message read by DATA or BDAT goes to the handler's DATA hook, or is refused;
        either way the transaction ends."""
        assert self.envelope is not None
        if reader.refusal is not None:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(reader.refusal)
            return
        content = reader.content()
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    # -- BDAT -------------------------------------------------------------------------

    async def smtp_BDAT(self, arg: str | None) -> None:
        # The octets after the command line are the chunk, whatever the reply:
        # a refused chunk is read and dropped (RFC 3030 2), else its octets
        # would run as commands. Only a size that cannot be read leaves the
        # chunk's end unknown, and then the connection cannot go on.
        given = _BDAT_ARGUMENT.fullmatch(arg or "")
        if given is None:
            await self.push(BDAT_SYNTAX)
            self.say_goodbye(BDAT_LOST_TRACK)
            return
        size, last = int(given[1]), given[2] is not None
        refusal = self._bdat_refusal()
        if refusal is not None:
            if await self._read_chunk(size, None):
                await self.push(refusal)
            return
        envelope = self.envelope
        assert isinstance(envelope, RelayEnvelope)  # _create_envelope
        if envelope.chunks is None:
            envelope.chunks = self._message_reader()
        reader = envelope.chunks
        if not await self._read_chunk(size, reader):
            return  # the client went away; nothing was accepted
        if last:
            reader.finish()
        if last or reader.refusal is not None:
            await self._end_message(reader)
            return
        await self.push(f"250 2.0.0 {size} octets received")

    def _bdat_refusal(self) -> str | None:
        """The reply refusing a chunk in the session's state, or None when it may be taken."""
        session, envelope = self.session, self.envelope
        if session is None or not session.extended_smtp:
            return "503 5.5.1 Error: send EHLO first"
        if self._auth_required and not session.authenticated:
            return "530 5.7.0 Authentication required"
        if not isinstance(envelope, RelayEnvelope) or envelope.mail_from is None:
            return "503 5.5.1 Error: need MAIL command"
        if not envelope.rcpt_tos:
            return "503 5.5.1 Error: need RCPT command"
        return None

    async def _read_chunk(self, size: int, reader: DataReader | None) -> bool:
        """Read size octets into reader (None: drop them), a stream buffer at a time;
        False if the client went away first."""
        left = size
        with self._taking_content():
            while left:
                try:
                    piece = await self._reader.readexactly(min(left, self.line_length_limit))
                except asyncio.IncompleteReadError:
                    return False
                left -= len(piece)
                if reader is not None:
                    reader.take(piece)
        return True

    @contextlib.contextmanager
    def _taking_content(self) -> Iterator[None]:
        """While a message's content comes, any octet that arrives is activity
        (Postfix times each read): a client sending slowly is not idle, however
        long its reads take to fill. The session's time limit still holds."""
        self._content_coming = True
        try:
            yield
        finally:
            self._content_coming = False

    def data_received(self, data: bytes) -> None:
        if self._content_coming:
            self._reset_timeout()
        super().data_received(data)


def _final(reply: str) -> bool:
    """A reply that ends an exchange (not 354 or the 220 before a TLS handshake)."""
    return reply[0] in "245" and not reply.startswith("220")
