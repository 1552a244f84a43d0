"""The queue's own spans: queueing a notification in the message's trace.

Its other spans are the shared ones of kurrier.core.telemetry: each
message of an EnqueueMessages call (serving_message), publishing jobs
(publishing) and processing results (consuming).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kurrier.core.message import MessageRecord
from kurrier.core.telemetry import TRACER, stored_context, working_on

# The span of each kind of notification, by its RFC 3464 Action.
NOTICE_SPANS = {"failed": "bounce", "delayed": "delay warning", "relayed": "relayed notice"}


@contextmanager
def notifying(record: MessageRecord, notice_queue_id: str, action: str) -> Iterator[None]:
    """The span of queueing a delivery status notification, in the message's trace.

    Its kurrier.queue_id is the notification's; the message's is
    kurrier.dsn.original_queue_id, and kurrier.dsn.action says what the
    notice reports (failed, delayed, relayed).
    """
    with (
        working_on(notice_queue_id),
        TRACER.start_as_current_span(
            NOTICE_SPANS[action],
            context=stored_context(record.traceparent),
            attributes={
                "kurrier.queue_id": notice_queue_id,
                "kurrier.dsn.original_queue_id": record.queue_id,
                "kurrier.dsn.action": action,
            },
        ),
    ):
        yield
