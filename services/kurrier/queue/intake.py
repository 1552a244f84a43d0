"""Taking a message into the queue: a fresh record dispatched to every recipient,
stored with its body and first jobs by MessageStore.create.

Used by Enqueue (mail from ingress) and by the queue itself for delivery
status notifications, so both take exactly the same path.
"""

from __future__ import annotations

import logging
import time
from typing import IO

from kurrier.core.history import HISTORY, trace_id_of
from kurrier.core.message import MessageRecord, RecipientState
from kurrier.core.message_store import MessageStore
from kurrier.core.metrics import MESSAGES_QUEUED, tenant_label
from kurrier.core.telemetry import annotate, current_traceparent
from kurrier.queue.dispatch import mark_dispatched, report_dispatch

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, store: MessageStore) -> None:
        self._store = store

    async def accept(
        self, template: MessageRecord, body: IO[bytes], size: int
    ) -> MessageRecord | None:
        """Store the message; returns its record, or None if a retry found it already progressed.

        template carries the envelope; sizes and dispatch state are filled in
        here. Idempotent per queue id (MessageStore.create).
        """
        now = time.time()
        record = template.model_copy(
            update={
                "received_at": now,
                "size": size,
                "recipients": [
                    RecipientState(address=r.address, notify=r.notify, orcpt=r.orcpt)
                    for r in template.recipients
                ],
                # The trace this message's retries and bounce will join.
                "traceparent": current_traceparent(),
            }
        )
        annotate(record.queue_id, message_id=record.message_id_header)
        mark_dispatched(record, [r.address for r in record.recipients], now)
        stored = await self._store.create(record, body, size)
        if stored is None:
            return None
        record = stored[0]
        MESSAGES_QUEUED.add(1, tenant_label(record.tenant))
        HISTORY.record(
            record.queue_id,
            "queued",
            trace_id=trace_id_of(record.traceparent),
            # When it was taken in, so it comes before the first dispatch's events.
            at=record.received_at,
            sender=f"<{record.mail_from}>",
            recipients=", ".join(r.address for r in record.recipients),
            size=size,
        )
        # Stamped like `queued`, so a retried Enqueue's events are the same and shown once.
        report_dispatch(record, [r.address for r in record.recipients], record.received_at)
        log.info(
            "queued from=<%s> nrcpt=%d size=%d",
            record.mail_from,
            len(record.recipients),
            size,
            extra={"queue_id": record.queue_id},
        )
        return record
