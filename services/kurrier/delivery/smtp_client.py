"""A small asyncio SMTP client: one session that can carry many transactions.

Written for delivery's needs rather than taken from smtplib/aiosmtplib: it
pipelines MAIL/RCPT/DATA when the server offers PIPELINING, and MAIL/RCPT/BDAT
with the content in the same write when it also offers CHUNKING (RFC 3030: no
dot-stuffing, and no wait for a 354), reports a reply per recipient, and
keeps the session open for the next message (RSET after a failed one).
"""

from __future__ import annotations

import _ssl
import asyncio
import base64
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from kurrier.core.dsn_parameters import (
    MailParameters,
    RcptParameters,
    mail_parameters_text,
    rcpt_parameters_text,
)
from kurrier.delivery.dane import TlsaRecords, chain_problem

MAX_REPLY_LINES = 100
NO_MAIL_PARAMETERS = MailParameters()


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500


class SmtpTemporaryError(Exception):
    """The session failed in a way worth retrying later (network, TLS, 4xx greeting).

    status is the enhanced status code (RFC 3463) the deferral reports; reply
    the server's own, when it gave one (a 4xx greeting).
    """

    def __init__(self, message: str, status: str = "4.4.1", reply: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reply = reply


class TlsUnavailable(SmtpTemporaryError):
    """The server's TLS is missing or failed verification: not a network accident, so
    trying again soon will likely meet the same (delivery/require_tls.py bounces on it).

    result_type names the failure as TLS reports do (RFC 8460 4.3).
    """

    def __init__(self, message: str, status: str, result_type: str) -> None:
        super().__init__(message, status)
        self.result_type = result_type


# OpenSSL's verify codes (X509_V_ERR_*) that TLS reports name on their own.
_VERIFY_RESULT_TYPES = {10: "certificate-expired", 62: "certificate-host-mismatch"}


def _handshake_result_type(error: ssl.SSLError | ssl.CertificateError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return _VERIFY_RESULT_TYPES.get(error.verify_code, "certificate-not-trusted")
    return "validation-failure"


@dataclass
class TransactionResult:
    mail: Reply
    recipients: dict[str, Reply]
    data: Reply | None
    # False while the server has not seen the message content: a temporary
    # reply up to then is safe to try at another host (RFC 5321 5.1).
    body_sent: bool = False

    def reply_for(self, recipient: str) -> Reply:
        """The reply that decides a recipient's fate."""
        if not self.mail.ok:
            return self.mail
        rcpt = self.recipients[recipient]
        if not rcpt.ok or self.data is None:
            return rcpt
        return self.data

    def decided_before_content(self, recipient: str) -> bool:
        """Whether the recipient's reply came before the server had the message content."""
        return not self.body_sent or not self.mail.ok or not self.recipients[recipient].ok


def _peer_chain(writer: asyncio.StreamWriter) -> list[bytes]:
    """The certificates the server sent, its own first, as DER (verified or not)."""
    ssl_object = writer.get_extra_info("ssl_object")
    # SSLObject.get_unverified_chain is public from Python 3.13; 3.11 has it on _sslobj.
    chain = ssl_object._sslobj.get_unverified_chain() or []
    return [certificate.public_bytes(_ssl.ENCODING_DER) for certificate in chain]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def to_wire_body(body: bytes) -> bytes:
    """Dot-stuff a CRLF-terminated body and append the end-of-data marker (RFC 5321 4.5.2)."""
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


@dataclass
class SmtpSession:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    timeout: float
    extensions: dict[str, str] = field(default_factory=dict)
    tls: bool = False
    transactions: int = 0
    # Set once the current transaction's content is on its way: after that a
    # failure may mean the server has the message, so no other host is tried.
    body_started: bool = False

    @classmethod
    async def open(
        cls,
        address: str,
        port: int,
        *,
        server_name: str,
        helo_name: str,
        tls_mode: str,
        tls_context: ssl.SSLContext | None,
        timeout: float,
        connect_timeout: float,
        credentials: tuple[str, str] | None = None,
        tlsa: TlsaRecords | None = None,
    ) -> SmtpSession:
        """Connect to address, greet, apply the TLS mode, then authenticate if asked.

        server_name is the name the certificate must carry (the MX host name
        for MX routes) and the SNI sent; address is where to connect. In
        'dane' mode the certificate chain must match one of tlsa's records.
        """
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(address, port)
        except (OSError, TimeoutError) as error:
            raise SmtpTemporaryError(f"cannot connect: {error or 'timed out'}") from error
        session = cls(reader, writer, timeout)
        try:
            greeting = await session.read_reply()
            if greeting.code != 220:
                raise SmtpTemporaryError(f"greeted with {greeting}", reply=str(greeting))
            await session.ehlo(helo_name)
            if tls_mode != "none":
                await session._negotiate_tls(server_name, helo_name, tls_mode, tls_context, tlsa)
            if credentials is not None:
                await session.authenticate(*credentials)
        except BaseException:
            session.abort()
            raise
        return session

    async def _negotiate_tls(
        self,
        server_name: str,
        helo_name: str,
        tls_mode: str,
        tls_context: ssl.SSLContext | None,
        tlsa: TlsaRecords | None,
    ) -> None:
        if "STARTTLS" not in self.extensions:
            if tls_mode == "opportunistic":
                return
            raise TlsUnavailable(
                f"STARTTLS not offered; route requires TLS ({tls_mode})",
                "4.7.10",
                "starttls-not-supported",
            )
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            raise SmtpTemporaryError(f"STARTTLS refused: {reply}", "4.7.10")
        context = tls_context or ssl.create_default_context()
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.start_tls(context, server_hostname=server_name)
        except (ssl.SSLError, ssl.CertificateError) as error:
            raise TlsUnavailable(
                f"TLS handshake failed: {error}", "4.7.5", _handshake_result_type(error)
            ) from error
        except (OSError, TimeoutError) as error:
            raise SmtpTemporaryError(f"TLS handshake failed: {error}", "4.7.5") from error
        if tls_mode == "dane" and tlsa is not None:
            problem = chain_problem(tlsa, _peer_chain(self.writer))
            if problem is not None:
                raise TlsUnavailable(f"DANE: {problem}", "4.7.5", "tlsa-invalid")
        self.tls = True
        await self.ehlo(helo_name)  # RFC 3207: forget what was learnt before TLS

    async def authenticate(self, username: str, password: str) -> None:
        """AUTH PLAIN, else LOGIN (RFC 4954); credentials never cross a plaintext session.

        A refusal is temporary for us: wrong credentials are the relay's
        configuration problem, not a reason to bounce the sender's mail.
        """
        if not self.tls:
            raise SmtpTemporaryError("refusing to send credentials without TLS", "4.7.10")
        offered = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in offered:
            token = _b64(f"\0{username}\0{password}")
            reply = await self.command(f"AUTH PLAIN {token}")
        elif "LOGIN" in offered:
            reply = await self.command("AUTH LOGIN")
            for answer in (username, password):
                if reply.code != 334:
                    break
                reply = await self.command(_b64(answer))
        else:
            raise SmtpTemporaryError(f"no AUTH PLAIN or LOGIN offered ({offered})", "4.7.0")
        if reply.code != 235:
            raise SmtpTemporaryError(f"AUTH failed: {reply}", "4.7.0")

    async def ehlo(self, helo_name: str) -> None:
        reply = await self.command(f"EHLO {helo_name}")
        if reply.code != 250:
            raise SmtpTemporaryError(f"EHLO refused: {reply}")
        self.extensions = {}
        for line in reply.text.split("\n")[1:]:
            keyword, _, params = line.partition(" ")
            self.extensions[keyword.upper()] = params

    async def read_reply(self) -> Reply:
        lines: list[str] = []
        while True:
            try:
                # asyncio.timeout, not wait_for: no extra task per line (bench: hot path).
                async with asyncio.timeout(self.timeout):
                    raw = await self.reader.readline()
            except (OSError, TimeoutError, ValueError) as error:
                raise SmtpTemporaryError(f"reading reply failed: {error!r}") from error
            if not raw:
                raise SmtpTemporaryError("connection closed by the server")
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit() or len(lines) > MAX_REPLY_LINES:
                raise SmtpTemporaryError(f"malformed reply line {line[:80]!r}")
            lines.append(line[4:])
            if len(line) == 3 or line[3] == " ":
                return Reply(int(line[:3]), "\n".join(lines))

    async def _send(self, *data: bytes) -> None:
        if self.writer.is_closing():
            # asyncio drops such a write; uvloop (the services' loop) raises a
            # RuntimeError, which would escape the temporary-failure handling.
            raise SmtpTemporaryError("connection closed")
        try:
            self.writer.writelines(data)
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except (OSError, TimeoutError) as error:
            raise SmtpTemporaryError(f"sending failed: {error!r}") from error

    async def command(self, line: str) -> Reply:
        await self._send(line.encode() + b"\r\n")
        return await self.read_reply()

    @property
    def offers_dsn(self) -> bool:
        return "DSN" in self.extensions

    def _mail_command(
        self,
        mail_from: str,
        smtputf8: bool,
        body_type: str,
        size: int,
        dsn: MailParameters,
        require_tls: bool,
    ) -> str:
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={size}")
        if body_type == "8BITMIME" and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if smtputf8 and "SMTPUTF8" in self.extensions:
            params.append("SMTPUTF8")
        if self.offers_dsn:
            params.extend(mail_parameters_text(dsn))
        if require_tls:
            params.append("REQUIRETLS")
        return " ".join([f"MAIL FROM:<{mail_from}>", *params])

    def _rcpt_command(self, recipient: str, dsn: RcptParameters | None) -> str:
        params = rcpt_parameters_text(dsn) if dsn is not None and self.offers_dsn else []
        return " ".join([f"RCPT TO:<{recipient}>", *params])

    async def send(
        self,
        mail_from: str,
        recipients: list[str],
        body: bytes,
        *,
        smtputf8: bool = False,
        body_type: str = "",
        dsn: MailParameters = NO_MAIL_PARAMETERS,
        recipient_dsn: Mapping[str, RcptParameters] | None = None,
        require_tls: bool = False,
    ) -> TransactionResult:
        """One transaction of body (CRLF line endings, as stored).

        What the server may be sent (SMTPUTF8, 8-bit content) is the caller's
        decision (message_forms.py); SMTPUTF8 and BODY=8BITMIME are only
        named to a server that offers them, and the DSN parameters (RFC 3461)
        only to one that offers DSN. REQUIRETLS is named when asked: whether
        the server may be sent such a message is the caller's decision too
        (require_tls.py).
        """
        self.transactions += 1
        self.body_started = False
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        mail_line = self._mail_command(mail_from, smtputf8, body_type, len(body), dsn, require_tls)
        rcpt_lines = {r: self._rcpt_command(r, (recipient_dsn or {}).get(r)) for r in recipients}
        commands = [mail_line, *rcpt_lines.values()]
        if "PIPELINING" in self.extensions and "CHUNKING" in self.extensions:
            return await self._send_chunked(commands, recipients, body)
        wire_body = to_wire_body(body)
        if "PIPELINING" in self.extensions:
            await self._send("".join(f"{c}\r\n" for c in [*commands, "DATA"]).encode())
            mail = await self.read_reply()
            replies = {r: await self.read_reply() for r in recipients}
            data_go = await self.read_reply()
        else:
            mail = await self.command(mail_line)
            if not mail.ok:
                return TransactionResult(mail, dict.fromkeys(recipients, mail), None)
            replies = {r: await self.command(line) for r, line in rcpt_lines.items()}
            if not any(reply.ok for reply in replies.values()):
                await self.reset()
                return TransactionResult(mail, replies, None)
            data_go = await self.command("DATA")
        if data_go.code != 354:
            await self.reset()
            if mail.ok and any(reply.ok for reply in replies.values()):
                # DATA refused although recipients were accepted: that reply decides.
                return TransactionResult(mail, replies, data_go)
            return TransactionResult(mail, replies, None)
        if not mail.ok or not any(reply.ok for reply in replies.values()):
            # Pipelined DATA was accepted with nothing to deliver to: end it empty.
            await self._send(b".\r\n")
            await self.read_reply()
            return TransactionResult(mail, replies, None)
        self.body_started = True
        await self._send(wire_body)
        return TransactionResult(mail, replies, await self.read_reply(), body_sent=True)

    async def _send_chunked(
        self, commands: list[str], recipients: list[str], body: bytes
    ) -> TransactionResult:
        """MAIL, RCPT and one BDAT LAST with the content, all in one write.

        A server that accepts no recipient still reads the chunk and refuses
        the BDAT (RFC 3030 2), so the session stays in step.
        """
        head = "".join(f"{c}\r\n" for c in commands) + f"BDAT {len(body)} LAST\r\n"
        await self._send(head.encode(), body)
        mail = await self.read_reply()
        # From here the server may have taken the content.
        self.body_started = mail.ok
        replies = {r: await self.read_reply() for r in recipients}
        chunk = await self.read_reply()
        if not mail.ok or not any(reply.ok for reply in replies.values()):
            await self.reset()
            return TransactionResult(mail, replies, None)
        if not chunk.ok:
            await self.reset()
        return TransactionResult(mail, replies, chunk, body_sent=True)

    async def reset(self) -> None:
        reply = await self.command("RSET")
        if reply.code != 250:
            raise SmtpTemporaryError(f"RSET refused: {reply}")

    async def quit(self) -> None:
        with contextlib.suppress(SmtpTemporaryError):
            await self.command("QUIT")
        self.abort()

    def abort(self) -> None:
        self.writer.close()
