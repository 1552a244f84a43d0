"""Removing a finished message's record from the KV bucket.

Two services remove records: the queue, when a result, an expiry or an
administrator leaves nothing pending, and delivery, when its job was all that
was left of a message and delivered every recipient (delivery/completion.py).
Both go through remove_record, so a removal looks the same whoever made it.
"""

from __future__ import annotations

from kurrier.core.jetstream import RECORDS_PREFIX
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError
from nats.js.kv import KV_OP, KV_PURGE, MSG_ROLLUP_SUBJECT

# A removal leaves a purge marker in the bucket (so watchers learn of the
# deletion); it expires after this long instead of piling up. Markers cost
# nats-server memory: with an hour's TTL a 30-minute soak left 477 000 of
# them, and nats-server at 490 MB RSS (backlog included).
MARKER_TTL = 60.0

# JetStream's "wrong last sequence" errors: the subject moved past the
# revision the writer expected.
_WRONG_LAST_SEQUENCE = (10071, 10164)


class RecordChanged(Exception):
    """The record is no longer at the revision the removal expected."""


async def remove_record(js: JetStreamContext, queue_id: str, revision: int | None = None) -> None:
    """Purge the record (every revision of it); with revision, only if it is still at it.

    Raises RecordChanged when revision is given and the record moved on (or
    is gone already).
    """
    headers = {KV_OP: KV_PURGE, Header.ROLLUP.value: MSG_ROLLUP_SUBJECT}
    if revision is not None:
        headers[Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value] = str(revision)
    try:
        await js.publish(RECORDS_PREFIX + queue_id, headers=headers, msg_ttl=MARKER_TTL)
    except APIError as error:
        if revision is not None and error.err_code in _WRONG_LAST_SEQUENCE:
            raise RecordChanged(queue_id) from error
        raise
