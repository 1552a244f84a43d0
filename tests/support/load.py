"""A steady SMTP load that keeps score: what was acknowledged, refused, or left in doubt."""

from __future__ import annotations

import contextlib
import smtplib
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Ledger:
    """Every message the load tried to send, by unique marker."""

    acknowledged: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    # The refused ones whose reply was 5xx: the client gives up on them for good.
    refused_for_good: set[str] = field(default_factory=set)
    # The connection broke after DATA began: the relay may or may not have it.
    in_doubt: set[str] = field(default_factory=set)
    # Every refusal's reply code and when it came (time.monotonic()), a 421 greeting
    # included: when a client heard 4xx, not only that it did.
    replies: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def attempted(self) -> set[str]:
        return self.acknowledged | self.refused | self.in_doubt


# Every this many messages of a load one is larger than a job carries, so the
# queue keeps its body in its record, and moves it to the bodies stream when the
# record first changes (core/body_store.py): faults meet both kinds.
LARGE_EVERY = 4
LARGE_SIZE = 20 * 1024


def message(marker: str, size: int = 512) -> bytes:
    head = (
        f"From: load@client.test\r\nSubject: {marker}\r\nMessage-ID: <{marker}@client.test>\r\n\r\n"
    )
    line = b"x" * 76 + b"\r\n"
    return head.encode() + line * (size // len(line)) + b"x" * (size % len(line)) + b"\r\n"


class SteadyLoad:
    """`clients` threads, each sending on one reused session until stopped or out of budget
    (`budget` messages in all; None: no end but stop())."""

    def __init__(
        self,
        port: int,
        recipient: str,
        clients: int = 4,
        budget: int | None = 100_000,
        pace: float = 0.0,
        host: str = "127.0.0.1",
        name: str = "load",
    ) -> None:
        self.host = host
        self.name = name  # the markers' prefix: loads side by side never share one
        self.port = port
        self.recipient = recipient
        self.ledger = Ledger()
        self._clients = clients
        self._budget = budget
        self._pace = pace
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._counter = 0
        self._counter_lock = threading.Lock()

    def _next_marker(self, client: int) -> str | None:
        with self._counter_lock:
            if self._budget is not None and self._counter >= self._budget:
                return None
            self._counter += 1
            return f"{self.name}-{client}-{self._counter}"

    def _size_of(self, marker: str) -> int:
        return LARGE_SIZE if int(marker.rsplit("-", 1)[1]) % LARGE_EVERY == 0 else 512

    def _record(self, outcome: set[str], marker: str) -> None:
        with self.ledger.lock:
            outcome.add(marker)

    def _refused(self, marker: str, error: smtplib.SMTPException) -> None:
        if isinstance(error, smtplib.SMTPRecipientsRefused):
            codes = [code for code, _ in error.recipients.values()]
        else:
            codes = [getattr(error, "smtp_code", 0)]
        with self.ledger.lock:
            self._heard(codes)
            self.ledger.refused.add(marker)
            if any(code >= 500 for code in codes):
                self.ledger.refused_for_good.add(marker)

    def _heard(self, codes: list[int]) -> None:
        now = time.monotonic()
        self.ledger.replies.extend((now, code) for code in codes if code > 0)

    def _client(self, client: int) -> None:
        smtp: smtplib.SMTP | None = None
        while not self._stop.is_set():
            marker = self._next_marker(client)
            if marker is None:
                break
            try:
                if smtp is None:
                    smtp = smtplib.SMTP(self.host, self.port, timeout=30)
                body = message(marker, self._size_of(marker))
                smtp.sendmail("load@client.test", [self.recipient], body)
                self._record(self.ledger.acknowledged, marker)
            except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused) as error:
                self._refused(marker, error)
                smtp = _reset(smtp)
            except smtplib.SMTPDataError as error:
                self._refused(marker, error)
            except (OSError, smtplib.SMTPException) as error:
                # Refused connection or greeting (nothing sent), or a break mid-transaction.
                with self.ledger.lock:
                    self._heard([getattr(error, "smtp_code", 0)])
                    self.ledger.in_doubt.add(marker)
                _close(smtp)
                smtp = None
                self._stop.wait(0.2)  # back off like a real client would
            if self._pace:
                self._stop.wait(self._pace)
        _close(smtp)

    def start(self) -> SteadyLoad:
        for client in range(self._clients):
            thread = threading.Thread(target=self._client, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> Ledger:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.ledger

    def acknowledged(self) -> set[str]:
        """The markers acknowledged so far (the load may run on)."""
        with self.ledger.lock:
            return set(self.ledger.acknowledged)

    def wait_for_acknowledged(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.ledger.acknowledged) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {len(self.ledger.acknowledged)} of {count} acknowledged"
                )
            time.sleep(0.05)


def _reset(smtp: smtplib.SMTP | None) -> smtplib.SMTP | None:
    try:
        if smtp is not None:
            smtp.rset()
        return smtp
    except (OSError, smtplib.SMTPException):
        _close(smtp)
        return None


def _close(smtp: smtplib.SMTP | None) -> None:
    if smtp is not None:
        with contextlib.suppress(OSError):
            smtp.close()
