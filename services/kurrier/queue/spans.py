"""The queue's own span: queueing a bounce in the failed message's trace.

Its other spans are the shared ones of kurrier.core.telemetry: each
message of an EnqueueMessages call (serving_message), publishing jobs
(publishing) and processing results (consuming).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kurrier.core.message import MessageRecord
from kurrier.core.telemetry import TRACER, stored_context, working_on


@contextmanager
def bouncing(record: MessageRecord, notice_queue_id: str) -> Iterator[None]:
    """The span of queueing a delivery status notification, in the failed message's trace.

    Its kurrier.queue_id is the notification's; the failed message's is
    kurrier.dsn.original_queue_id.
    """
    with (
        working_on(notice_queue_id),
        TRACER.start_as_current_span(
            "bounce",
            context=stored_context(record.traceparent),
            attributes={
                "kurrier.queue_id": notice_queue_id,
                "kurrier.dsn.original_queue_id": record.queue_id,
            },
        ),
    ):
        yield
