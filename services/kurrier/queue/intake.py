"""Taking a message into the queue durably: body, record, first jobs — in that order.

Used by Enqueue (mail from ingress) and by the queue itself for delivery
status notifications, so both take exactly the same path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import IO

from kurrier.core.body_store import delete_body, store_body
from kurrier.core.message import MessageRecord, RecipientState
from kurrier.core.table_store import TableFollower
from kurrier.core.telemetry import MESSAGES_QUEUED, annotate, current_traceparent
from kurrier.queue.dispatch import mark_dispatched, publish_jobs
from kurrier.queue.records import RecordStore
from nats.js import JetStreamContext

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, js: JetStreamContext, records: RecordStore, tables: TableFollower) -> None:
        self._js = js
        self._records = records
        self._tables = tables

    async def accept(
        self, template: MessageRecord, body: IO[bytes], size: int
    ) -> MessageRecord | None:
        """Store the message; returns its record, or None if a retry found it already progressed.

        template carries the envelope; body store, sizes and dispatch state are
        filled in here. Idempotent per queue id: the body is deduplicated by
        JetStream, the record is created only once, and the first jobs carry
        the same dedup ids on every retry.
        """
        now = time.time()
        body_store = await store_body(self._js, template.queue_id, body, size)
        record = template.model_copy(
            update={
                "received_at": now,
                "size": size,
                "body_store": body_store,
                "recipients": [RecipientState(address=r.address) for r in template.recipients],
                # The trace this message's retries and bounce will join.
                "traceparent": current_traceparent(),
            }
        )
        annotate(record.queue_id, message_id=record.message_id_header)
        addresses = [r.address for r in record.recipients]
        mark_dispatched(record, addresses, now)
        try:
            # The record only after its body is stored: a live record always has
            # its body (delivery acks a job whose body is gone without a result,
            # so such a record would be re-dispatched forever).
            revision = await self._records.create(record)
            if revision is None:
                found = await self._records.get(record.queue_id, fresh=True)
                if found is None or found[0].dispatches != 1:
                    return None
                record, revision = found
            await publish_jobs(self._js, self._tables.table, record, addresses, revision)
        except BaseException:
            # The caller answers 451 and the client keeps the message: take back what
            # was stored, or the sweeper would deliver it again.
            # Best effort (NATS may be the reason we are here); the sweeper remains
            # the backstop for what cannot be taken back.
            with contextlib.suppress(Exception):
                await self._records.delete(record.queue_id)
                await delete_body(self._js, record.queue_id, record.body_store)
            raise
        MESSAGES_QUEUED.add(1)
        log.info(
            "queued from=<%s> nrcpt=%d size=%d",
            record.mail_from,
            len(addresses),
            size,
            extra={"queue_id": record.queue_id},
        )
        return record
