"""Reading messages' history back (MessageHistory): one message's, or a sender's or recipient's.

The history is stored in batches per process (core/history.py), not per
message, so a search reads every batch from a start time on: the queue
id's time for one message (queue ids begin with their arrival in
milliseconds), or the caller's `since`. JetStream starts the pass at that
time itself (a consumer's start time), so `--since 1h` reads an hour of
history, not the whole stream.
"""

from __future__ import annotations

import datetime
from collections import defaultdict
from collections.abc import AsyncIterator

from kurrier.core.domains import canonical_address
from kurrier.core.history import HistoryEvent, decode_batch
from kurrier.core.jetstream import HISTORY_STREAM, HISTORY_SUBJECTS, one_pass
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

# Processes' clocks differ a little from the one that stamps stored batches.
CLOCK_SLACK = 300.0


def arrival_of(queue_id: str) -> float | None:
    """When a message arrived, from its queue id (core/message.py new_queue_id)."""
    try:
        return int(queue_id[:12], 16) / 1000
    except ValueError:
        return None


async def read_history(js: JetStreamContext, since: float) -> AsyncIterator[HistoryEvent]:
    """Every event stored from since (Unix time; 0: all) up to what was stored when called."""
    last = (await js.stream_info(HISTORY_STREAM)).state.last_seq
    if not last:
        return
    start = datetime.datetime.fromtimestamp(since, datetime.UTC) if since > 0 else None
    policy = DeliverPolicy.BY_START_TIME if start else DeliverPolicy.ALL
    passing = one_pass(js, HISTORY_SUBJECTS, HISTORY_STREAM, policy, start, until_sequence=last)
    async for message in passing:
        for event in decode_batch(message.data):
            yield event


def _mentions(event: HistoryEvent, sender: str, recipient: str) -> bool:
    """Whether the event names the address (lowercase, as `kurrier queue list` compares)."""
    details = event.details
    if sender and details.get("sender", "").lower() == sender:
        return True
    if not recipient:
        return False
    named = [*details.get("recipients", "").split(", "), details.get("recipient", "")]
    return recipient in (address.lower() for address in named)


async def search_history(
    js: JetStreamContext, queue_id: str, sender: str, recipient: str, since: float
) -> list[HistoryEvent]:
    """The events of the message queue_id, or of every message from sender or to
    recipient, in the order they happened; an event stored twice (a batch whose
    publish timed out after it was stored, and was sent again) is shown once."""
    if queue_id and not since:
        arrival = arrival_of(queue_id)
        since = arrival - CLOCK_SLACK if arrival else 0.0
    wanted_sender = f"<{canonical_address(sender)}>" if sender and sender != "<>" else sender
    wanted_sender = wanted_sender.lower()
    wanted_recipient = canonical_address(recipient).lower() if recipient else ""
    by_message: defaultdict[str, dict[str, HistoryEvent]] = defaultdict(dict)
    chosen: set[str] = {queue_id} if queue_id else set()
    async for event in read_history(js, since):
        if queue_id and event.queue_id != queue_id:
            continue
        by_message[event.queue_id][event.model_dump_json()] = event
        if not queue_id and _mentions(event, wanted_sender, wanted_recipient):
            chosen.add(event.queue_id)
    events = [event for q in chosen for event in by_message[q].values()]
    return sorted(events, key=lambda event: (event.at, event.queue_id))
