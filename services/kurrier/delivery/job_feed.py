"""Jobs pulled ahead from a durable pull consumer, as many as there is room for.

nats-py's fetch costs, per call, a request that may find nothing (no_wait),
then one that waits, a status message ending it, a timer and tasks; at
hundreds of jobs a second, each call bringing a job or two, that was 6-9 %
of delivery's CPU per 1 KB message (bench/results/2026-12-07-job-feed.md).
Here pull requests stay open at the server (`expires`, `idle_heartbeat`, as
nats.go's Consume keeps them), each job is handed on as it comes, and
another request goes out once enough room has freed up to be worth one.

`_asked` counts jobs asked for and not yet come. A job counts it down, and
so does the 408 or 409 that ends a request early, by the part of its batch
left unused (its Nats-Pending-Messages). A request can also end unseen: the
connection moved to another node, the server restarted, the consumer's
leader moved away. Then nothing comes, not even idle heartbeats, and after
a few heartbeats' silence, or at once after a reconnect, the count starts
over. Should a request given up for lost bring jobs after all, those beyond
the room wait in `backlog` (kept alive by the worker's heartbeat) until a
slot frees, so the room is never exceeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

# How long a pull request stays open at the server, and how often the server
# says it is still open while no job comes. Silence for HEARTBEATS_MISSED of
# them means the requests are gone.
PULL_EXPIRES = 30.0
PULL_HEARTBEAT = 1.0
HEARTBEATS_MISSED = 3
# At stop, how long to wait for NATS to confirm no more jobs are on their way.
DRAIN_WITHIN = 5.0

_NANOSECONDS = 1_000_000_000
_IDLE_HEARTBEAT = "100"
_REQUEST_EXPIRED = "408"


class JobFeed:
    """Hands each job of one consumer to `start`, asking for no more than `room()` allows.

    `room()` is how many more jobs the worker takes now; call room_freed()
    whenever it may have grown. Jobs that come after stop() are given back
    (nak) for another worker.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        consumer: str,
        room: Callable[[], int],
        start: Callable[[Msg], None],
        batch: int,
        expires: float = PULL_EXPIRES,
        heartbeat: float = PULL_HEARTBEAT,
    ) -> None:
        if 2 * heartbeat > expires:
            # nats-server refuses such a request (400): it would never be answered.
            raise ValueError(f"heartbeat {heartbeat}s is more than half of expires {expires}s")
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._info_subject = f"$JS.API.CONSUMER.INFO.{stream}.{consumer}"
        self._room = room
        self._start = start
        # A request for fewer jobs than this waits until more room has freed
        # up, unless none is open: one request per few jobs, not per job.
        self._least = max(1, batch // 4)
        self._expires = expires
        self._heartbeat = heartbeat
        self._asked = 0
        self._heard = time.monotonic()
        self._reconnects = nc.stats["reconnects"]
        self.backlog: deque[Msg] = deque()
        self._wake = asyncio.Event()
        self._inbox = ""
        self._subscription: Subscription | None = None
        self._stopping = False

    async def run(self) -> None:
        """Ask for jobs as room frees up, until stop(); then drop the open requests
        and give back what came since and what waits in the backlog.

        Without a subscriber for their replies the server passes over the open
        requests, so the jobs they would have brought go to other workers. The
        subscription is drained, not just dropped, so jobs already on their way
        are given back too; one that the server routes here in the instant it
        takes the unsubscription goes to another worker after its ack wait, as
        any job of a worker that went away does.

        nats-py's drain writes its PING straight to the socket, ahead of the
        UNSUB it only buffered, so its PONG does not mean the server has let go
        of the requests. A request written after the UNSUB does: once it is
        answered, no job can come to them, and run() returns only then.
        """
        self._inbox = self._nc.new_inbox()
        self._subscription = await self._nc.subscribe(self._inbox, cb=self._received)
        try:
            while not self._stopping:
                self._wake.clear()
                self._notice_lost_requests()
                await self._ask()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._heartbeat):
                        await self._wake.wait()
        finally:
            try:
                async with asyncio.timeout(DRAIN_WITHIN):
                    await self._subscription.drain()  # type: ignore[no-untyped-call]
                    await self._nc.request(self._info_subject, b"", timeout=DRAIN_WITHIN)
            except Exception as error:
                # NATS away or slow: a job its requests still bring comes to
                # another worker after its ack wait.
                log.info("could not confirm the pull requests were let go: %r", error)
            while self.backlog:
                await _give_back(self.backlog.popleft())

    def room_freed(self) -> None:
        """Start what waits in the backlog while there is room, and ask for more once
        that is worth a request (called as each job ends: most end without one)."""
        while self.backlog and not self._stopping and self._room() > 0:
            self._start(self.backlog.popleft())
        if self._wanted():
            self._wake.set()

    def stop(self) -> None:
        """Take no more jobs: run() ends, and jobs that still come are given back."""
        self._stopping = True
        self._wake.set()

    async def _received(self, message: Msg) -> None:
        self._heard = time.monotonic()
        status = message.headers.get("Status") if message.headers else None
        if status is None:
            self._asked = max(0, self._asked - 1)
            if self._stopping:
                await _give_back(message)
            elif self.backlog or self._room() <= 0:
                self.backlog.append(message)
            else:
                self._start(message)
            return
        if status == _IDLE_HEARTBEAT:
            return
        assert message.headers is not None  # it has a status
        unused = message.headers.get("Nats-Pending-Messages", "")
        if unused.isdigit():
            self._asked = max(0, self._asked - int(unused))
            self._wake.set()
        else:
            # Ended without saying how much of it went unused (the consumer
            # deleted, or too many requests waiting): start over at the next
            # heartbeat, not at once, which could repeat the refusal in a loop.
            self._asked = 0
        if status != _REQUEST_EXPIRED:
            log.info(
                "pull request ended by the server: %s %s",
                status,
                message.headers.get("Description", ""),
            )

    def _notice_lost_requests(self) -> None:
        reconnects = self._nc.stats["reconnects"]
        if reconnects != self._reconnects:
            self._reconnects = reconnects
            self._asked = 0
        elif self._asked and time.monotonic() - self._heard > HEARTBEATS_MISSED * self._heartbeat:
            log.info("no word on %d job(s) asked for; asking again", self._asked)
            self._asked = 0

    def _wanted(self) -> int:
        """How many jobs to ask for now; 0 while that would be too few for a request."""
        want = self._room() - len(self.backlog) - self._asked
        if want <= 0 or (self._asked and want < self._least):
            return 0
        return want

    async def _ask(self) -> None:
        want = self._wanted()
        if not want:
            return
        request = {
            "batch": want,
            "expires": int(self._expires * _NANOSECONDS),
            "idle_heartbeat": int(self._heartbeat * _NANOSECONDS),
        }
        self._asked += want
        self._heard = time.monotonic()
        try:
            await self._nc.publish(
                self._next_subject, json.dumps(request).encode(), reply=self._inbox
            )
        except Exception as error:
            self._asked -= want
            log.warning("could not ask for jobs, trying again: %r", error)


async def _give_back(message: Msg) -> None:
    # Unanswered, the job comes again after its ack wait anyway.
    with contextlib.suppress(Exception):
        await message.nak()
