"""Finishing a message in delivery, when its last job delivered every recipient.

Most messages end with one job that delivers every recipient. Reporting that
to the queue would cost a stored result, the queue's fetch and ack of it, and
its removal of record and body; delivery ends the message itself instead
(MessageStore.finish). The removal is guarded by the record's revision as the
job was published, which the job carries only when it is all the message has
left to do: if the record moved on meanwhile (an administrator held it, the
sweeper dispatched it again), the removal is refused and the result goes to
the queue like any other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from kurrier.core.history import HISTORY
from kurrier.core.message import DeliveryJob, RecipientOutcome
from kurrier.core.message_store import MessageStore
from kurrier.core.metrics import count_final
from kurrier.core.records import RecordChanged
from nats.errors import Error as NatsError

log = logging.getLogger(__name__)


async def finish_delivered(
    store: MessageStore,
    job: DeliveryJob,
    outcomes: list[RecipientOutcome],
    acknowledge: Callable[[], Awaitable[None]],
) -> bool:
    """Remove the message, and acknowledge the job, if it delivered all that was left.

    False when the queue must hear the result instead (the job is not
    acknowledged): the job was not the message's last work, a recipient was
    not delivered or is owed a "relayed" notice, or the record changed.
    """
    if job.record_revision is None or any(o.outcome != "delivered" or o.relayed for o in outcomes):
        return False
    try:
        # A job that is all its message had left never has a retry schedule.
        await store.finish(
            job.queue_id,
            job.record_revision,
            job.body_store,
            scheduled=False,
            acknowledge=acknowledge,
        )
    except RecordChanged:
        return False
    except (NatsError, TimeoutError) as error:
        # Perhaps removed, perhaps not: the queue, hearing the result, finds out.
        log.warning(
            "could not remove the delivered message, reporting to the queue: %r",
            error,
            extra={"queue_id": job.queue_id},
        )
        return False
    now = time.time()
    for outcome in outcomes:
        count_final("delivered", job.received_at, now, job.tenant)
        HISTORY.record(
            job.queue_id, "delivered", at=now, recipient=outcome.address, reply=outcome.reply
        )
        log.info(
            "to=<%s> status=delivered dispatch=%d reply=%s",
            outcome.address,
            job.dispatch,
            outcome.reply,
            extra={"queue_id": job.queue_id},
        )
    return True
