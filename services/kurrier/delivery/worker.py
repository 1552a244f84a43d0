"""Delivery workers: pull jobs from JetStream, send them on, report each recipient's fate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from kurrier.core.body_store import load_body
from kurrier.core.jetstream import (
    DELIVERY_CONSUMER,
    JOBS_STREAM,
    RESULTS_STREAM,
    result_subject,
)
from kurrier.core.message import DeliveryJob, DeliveryResult, Outcome, RecipientOutcome
from kurrier.core.routing import CompiledRoute, domain_of
from kurrier.core.table_store import TableFollower
from kurrier.delivery.connection_pool import ConnectionPool
from kurrier.delivery.smtp_client import (
    Reply,
    SmtpSession,
    SmtpTemporaryError,
    to_wire_body,
)
from kurrier.delivery.tls_policy import client_context
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import FetchTimeoutError, NotFoundError
from pydantic import ValidationError

log = logging.getLogger(__name__)

# A job not acknowledged within ACK_WAIT goes to another worker; a worker busy
# with a slow transaction says so every ACK_WAIT / 3 (msg.in_progress()).
ACK_WAIT = 30.0


@dataclass(frozen=True)
class DeliverySettings:
    helo_name: str
    concurrency: int = 32
    smtp_timeout: float = 60.0
    tls_ca_file: str | None = None


def outcome_of(recipient: str, reply: Reply) -> RecipientOutcome:
    outcome: Outcome
    if reply.ok:
        outcome = "delivered"
    elif reply.permanent:
        outcome = "bounced"
    else:
        outcome = "deferred"
    return RecipientOutcome(address=recipient, outcome=outcome, reply=str(reply))


def deferred(recipients: list[str], text: str) -> list[RecipientOutcome]:
    return [RecipientOutcome(address=r, outcome="deferred", reply=text) for r in recipients]


class DeliveryWorker:
    def __init__(
        self,
        js: JetStreamContext,
        tables: TableFollower,
        settings: DeliverySettings,
    ) -> None:
        self._js = js
        self._tables = tables
        self._settings = settings
        self.pool = ConnectionPool()
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Pull jobs while free slots remain; on stop, finish what is in flight."""
        subscription = await self._js.pull_subscribe(
            "kurrier.job.*",
            durable=DELIVERY_CONSUMER,
            stream=JOBS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT,
                max_deliver=-1,
                max_ack_pending=max(1000, self._settings.concurrency * 4),
            ),
        )
        try:
            while not stop.is_set():
                free = self._settings.concurrency - len(self._in_flight)
                if free <= 0:
                    await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    messages = await subscription.fetch(batch=free, timeout=1)
                except (FetchTimeoutError, TimeoutError):
                    continue
                for message in messages:
                    task = asyncio.create_task(self._handle(message))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
        finally:
            if self._in_flight:
                await asyncio.wait(self._in_flight)
            await self.pool.close_idle(older_than=0)

    async def _heartbeat(self, message: Msg) -> None:
        while True:
            await asyncio.sleep(ACK_WAIT / 3)
            await message.in_progress()

    async def _handle(self, message: Msg) -> None:
        try:
            job = DeliveryJob.model_validate_json(message.data)
        except ValidationError as error:
            log.error("discarding an unreadable delivery job: %s", error)
            await message.term()
            return
        heartbeat = asyncio.create_task(self._heartbeat(message))
        try:
            try:
                body = await load_body(self._js, job.queue_id, job.body_store)
            except NotFoundError:
                log.warning("body gone (message deleted)", extra={"queue_id": job.queue_id})
                await message.ack()
                return
            outcomes = await self.deliver(job, body)
            result = DeliveryResult(queue_id=job.queue_id, attempt=job.attempt, outcomes=outcomes)
            await self._js.publish(
                result_subject(job.queue_id),
                result.model_dump_json().encode(),
                stream=RESULTS_STREAM,
                headers={"Nats-Msg-Id": f"result:{job.queue_id}:{job.attempt}:{message.sid}"},
            )
            await message.ack()
        except Exception:
            # NATS trouble while loading or reporting: leave the job to be redelivered.
            log.exception("delivery attempt failed", extra={"queue_id": job.queue_id})
            with contextlib.suppress(Exception):
                await message.nak(delay=5)
        finally:
            heartbeat.cancel()

    async def deliver(self, job: DeliveryJob, body: bytes) -> list[RecipientOutcome]:
        table = self._tables.table
        sender_domain = domain_of(job.mail_from)
        groups: dict[str, tuple[CompiledRoute | None, list[str]]] = {}
        for recipient in job.recipients:
            route = table.route_for(domain_of(recipient), sender_domain)
            key = route.name if route else ""
            groups.setdefault(key, (route, []))[1].append(recipient)
        wire_body = to_wire_body(body)
        results = await asyncio.gather(
            *(self._deliver_group(job, route, rcpts, wire_body) for route, rcpts in groups.values())
        )
        return [outcome for group in results for outcome in group]

    async def _deliver_group(
        self, job: DeliveryJob, route: CompiledRoute | None, recipients: list[str], wire_body: bytes
    ) -> list[RecipientOutcome]:
        if route is None:
            return deferred(recipients, "451 4.4.0 no route matches the recipient domain")
        if route.problem:
            return deferred(
                recipients, f"451 4.3.5 route {route.name} is unusable: {route.problem}"
            )
        if route.smarthost is None:
            return deferred(recipients, "451 4.3.5 MX delivery is not supported yet")
        host, port = route.smarthost
        settings = self._settings

        async def open_session() -> SmtpSession:
            return await SmtpSession.open(
                host,
                port,
                helo_name=settings.helo_name,
                tls_mode=route.tls_mode,
                tls_context=client_context(route.tls_mode, settings.tls_ca_file),
                timeout=settings.smtp_timeout,
            )

        try:
            session = await self.pool.acquire(
                route.destination, route.max_connections, open_session
            )
        except SmtpTemporaryError as error:
            return deferred(recipients, f"451 4.4.1 {error}")
        try:
            result = await session.send(
                job.mail_from,
                recipients,
                wire_body,
                smtputf8=job.smtputf8,
                body_type=job.body_type,
            )
        except SmtpTemporaryError as error:
            await self.pool.release(route.destination, session, reusable=False)
            return deferred(recipients, f"451 4.4.2 {host}:{port}: {error}")
        except BaseException:
            await self.pool.release(route.destination, session, reusable=False)
            raise
        await self.pool.release(route.destination, session, reusable=True)
        return [outcome_of(r, result.reply_for(r)) for r in recipients]
