"""Property-based fuzzing of ingress's SMTP command handling: the path parser, then a live session.

The session half runs the real IngressSMTP and RelayHandler on a real socket in
a thread of this process. Its routing table is empty, so no recipient is ever
accepted and the queue client (pointing nowhere) is never called.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kurrier.core.cluster_counters import ClusterLeases
from kurrier.core.jetstream import connect, disconnect, ensure_layout
from kurrier.core.table_store import TableFollower
from kurrier.ingress.auth_failures import AuthFailures
from kurrier.ingress.handler import RelayHandler
from kurrier.ingress.identities import Identities
from kurrier.ingress.message_rates import MessageRates
from kurrier.ingress.queue_client import QueueClient
from kurrier.ingress.session_limits import SessionLimits
from kurrier.ingress.smtp_path import _MAILBOX, parse_path
from kurrier.ingress.smtp_session import IngressSMTP, Listener, Sessions
from kurrier.ingress.tenant_quotas import TenantQuotas

from tests.support.nats import NatsServer
from tests.support.processes import free_port

_MAILBOX_RE = re.compile(_MAILBOX)


@given(st.text(max_size=300))
def test_path_parser_never_lets_control_characters_through(text: str) -> None:
    parsed = parse_path(text)
    if parsed is None:
        return
    mailbox, parameters = parsed
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) < 0xE000 for c in mailbox)
    assert "<" not in mailbox and ">" not in mailbox
    assert mailbox == "" or "@" in mailbox
    assert parameters == parameters.strip(" ")


_ATOM = st.text(st.sampled_from([*"azAZ09!#$%&'*+/=?^_`{|}~-", "ü", "ß", "日"]), min_size=1)
_QUOTED = st.text(st.sampled_from([*'ab @"\\x()<>,;:%!', "é"]), max_size=12).map(
    lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
MAILBOXES = st.builds(
    "{}@{}".format,
    st.one_of(st.lists(_ATOM, min_size=1, max_size=4).map(".".join), _QUOTED),
    st.one_of(st.lists(_LABEL, min_size=1, max_size=4).map(".".join), st.just("[192.0.2.1]")),
)


@given(MAILBOXES)
def test_every_mailbox_of_the_grammar_parses_back(mailbox: str) -> None:
    assert _MAILBOX_RE.fullmatch(mailbox), "the strategy makes grammar-conforming mailboxes"
    parsed = parse_path(f"<{mailbox}> SIZE=1")
    if len(mailbox.encode()) > 200:  # over the RFC 5321 length limits: refused, never mangled
        assert parsed in (None, (mailbox, "SIZE=1"))
    else:
        local = mailbox.rpartition("@")[0]
        assert parsed == ((mailbox, "SIZE=1") if len(local.encode()) <= 64 else None)


@pytest.fixture(scope="module")
def live_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    workdir = tmp_path_factory.mktemp("fuzz-nats")
    nats_server = NatsServer(workdir, workdir)
    nats_server.start()
    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        tables = TableFollower()
        nc = await connect(nats_server.url, "fuzz")
        await ensure_layout(nc.jetstream())
        rates = await MessageRates.open(nc, 1)
        queue = QueueClient("127.0.0.1:9")
        quotas = await TenantQuotas.open(nc, 1)
        failures = await AuthFailures.open(nc, 1, 5)
        handler = RelayHandler(
            tables, queue, "fuzz.test", Identities(None), rates, quotas, failures
        )
        clients = await ClusterLeases.open(nc.jetstream(), "client-connections", 1)
        sessions = Sessions(SessionLimits(idle_timeout=5), tables, clients)
        server = await loop.create_server(
            lambda: IngressSMTP(
                handler,
                listener=Listener("submission", offers_auth=True),
                sessions=sessions,
                hostname="fuzz.test",
                tls_context=None,
            ),
            "127.0.0.1",
            port,
        )
        started.set()
        async with server:
            await stop.wait()
        await clients.flush()  # the sessions' releases, as ingress does before disconnecting
        await disconnect(nc)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    started.wait(10)
    yield port
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    nats_server.stop()


VERBS = ["EHLO", "HELO", "MAIL FROM:", "RCPT TO:", "DATA", "RSET", "NOOP", "VRFY", "AUTH", "HELP"]
LINE = (
    st.one_of(
        st.tuples(st.sampled_from(VERBS), st.text(max_size=40)).map(lambda t: f"{t[0]} {t[1]}"),
        st.text(max_size=60),
    )
    .map(lambda text: text.encode("utf-8", "surrogateescape"))
    .map(lambda line: line.replace(b"\r", b"").replace(b"\n", b""))
    # The session's end is the QUIT the test sends last.
    .filter(lambda line: line.split(b" ", 1)[0].upper() != b"QUIT")
)


def _replies(sock: socket.socket, count: int) -> list[bytes]:
    """The final lines of the first count replies (fewer if the server closes first)."""
    buffer, finals = b"", list[bytes]()
    while len(finals) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\r\n")
        finals += [line for line in lines if len(line) < 4 or line[3:4] != b"-"]
    return finals


def _replies_until_closed(sock: socket.socket) -> list[bytes]:
    """The final line of every reply the server sends before it closes, and what trails."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    *lines, trailing = received.split(b"\r\n")
    assert trailing == b"", f"a reply without its CRLF: {trailing!r}"
    return [line for line in lines if len(line) < 4 or line[3:4] != b"-"]


@given(st.lists(LINE, min_size=1, max_size=15))
def test_any_command_sequence_gets_one_well_formed_reply_each(
    live_port: int, lines: list[bytes]
) -> None:
    with socket.create_connection(("127.0.0.1", live_port), timeout=10) as sock:
        assert _replies(sock, 1)[0].startswith(b"220")
        sock.sendall(b"".join(line + b"\r\n" for line in lines) + b"QUIT\r\n")
        replies = _replies_until_closed(sock)
    # One reply per command, in order, until the session ends: at the QUIT sent
    # last, or at a 421 when a command went past its budget (a limit of the
    # server's, which closes the session); nothing is sent after either.
    endings = [n for n, reply in enumerate(replies) if reply.startswith((b"221", b"421"))]
    assert endings == [len(replies) - 1], (lines, replies)
    if replies[-1].startswith(b"221"):
        assert len(replies) == len(lines) + 1, (lines, replies)
    else:
        assert len(replies) <= len(lines), (lines, replies)
    for reply in replies:
        assert reply[:3].isdigit() and reply[0:1] in b"2345", reply
        assert not reply.startswith(b"500 5.5.2 Error: ("), f"unhandled exception: {reply!r}"
        assert reply[0:1] not in b"45" or reply[4:5].isdigit(), f"no enhanced code: {reply!r}"


# Any octets, control bytes and bare CR/LF included, after a verb or alone.
RAW_LINE = st.one_of(
    st.tuples(st.sampled_from(VERBS), st.binary(max_size=40)).map(
        lambda t: t[0].encode() + b" " + t[1]
    ),
    st.binary(max_size=60),
)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


@given(st.lists(RAW_LINE, min_size=1, max_size=15))
def test_no_reply_carries_a_control_byte(live_port: int, lines: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", live_port), timeout=10) as sock:
        assert _replies(sock, 1)[0].startswith(b"220")
        sock.sendall(b"".join(line + b"\r\n" for line in lines) + b"QUIT\r\n")
        replies = _replies(sock, len(lines) + 1)
    assert replies, "no reply at all"
    for reply in replies:
        assert not _CONTROL.search(reply), reply
        reply.decode("utf-8")  # never a half character


_PLAIN = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@given(
    command=st.one_of(
        st.sampled_from([b"QUIT", b"RSET", b"EHLO x", b"MAIL FROM:<a@b.test>"]), _PLAIN
    ),
    bare=st.sampled_from([b"\n", b"\r"]),
    at=st.integers(0, 40),
)
def test_a_command_with_a_bare_cr_or_lf_is_never_carried_out(
    live_port: int, command: bytes, bare: bytes, at: int
) -> None:
    """A bare LF ends the line (in place of CRLF); a bare CR is anywhere in it."""
    line = command + bare if bare == b"\n" else command[:at] + bare + command[at:] + b"\r\n"
    with socket.create_connection(("127.0.0.1", live_port), timeout=10) as sock:
        assert _replies(sock, 1)[0].startswith(b"220")
        sock.sendall(b"HELO fuzz.test\r\n" + line + b"NOOP\r\n")
        helo, refusal, noop = _replies(sock, 3)
    assert helo.startswith(b"250")
    assert refusal.startswith(b"500 5.5.2 Error: bare <"), refusal
    assert noop.startswith(b"250"), "the session goes on (QUIT was not carried out)"


@given(st.lists(st.tuples(st.binary(max_size=80), st.booleans()), min_size=1, max_size=8))
def test_refused_bdat_chunks_are_read_whatever_they_hold(
    live_port: int, chunks: list[tuple[bytes, bool]]
) -> None:
    """No transaction, so each chunk is refused; its octets (commands, CRLF.CRLF,
    anything) are read to the announced end and never run: one reply per BDAT."""
    bdats = b"".join(
        f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk for chunk, last in chunks
    )
    with socket.create_connection(("127.0.0.1", live_port), timeout=10) as sock:
        assert _replies(sock, 1)[0].startswith(b"220")
        sock.sendall(b"EHLO fuzz.test\r\n" + bdats + b"NOOP\r\nQUIT\r\n")
        replies = _replies_until_closed(sock)
    refusals = [b"503 5.5.1 Error: need MAIL command"] * len(chunks)
    assert replies[1:] == [*refusals, b"250 OK", b"221 Bye"], (chunks, replies)
