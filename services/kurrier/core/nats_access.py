"""Each component's NATS identity: the streams it uses and what it may do there.

The one place that says who may do what in NATS. `kurrier up` writes these
permissions into its nats-server configuration; the chart renders them from
charts/kurrier/files/nats-permissions.json, written from here by
`python -m kurrier.core.nats_access` (a test keeps the file current). The
service skeleton creates the streams its component may create and waits for
the others it uses.

A JetStream request is a publish to `$JS.API.<verb>.<stream>...`, so
permissions on those subjects are permissions on streams. Replies come back
on the client's inbox, and each user has its own (`_INBOX.<user>.>`): with a
shared `_INBOX.>` any user could read the replies to another's reads, bodies
included.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from kurrier.core.jetstream import (
    BODIES_STREAM,
    CONFIG_BUCKET,
    DISPATCH_STREAM,
    EARLIER_DISPATCH_STREAM,
    HISTORY_STREAM,
    JOBS_STREAM,
    LEASES_BUCKET,
    LIMITS_BUCKET,
    MESSAGES_BUCKET,
    MESSAGES_STREAM,
    OBJECT_BUCKET,
    OUTCOMES_STREAM,
    RESULTS_STREAM,
    ROUTING_TABLE_KEY,
    SHAPING_BUCKET,
    dispatch_subject,
    earlier_dispatch_subject,
    history_subjects,
    inbox_prefix,
    kv_stream,
    object_stream,
    outcome_subject,
)

API = "$JS.API"
CONFIG_STREAM = kv_stream(CONFIG_BUCKET)
LEASES_STREAM = kv_stream(LEASES_BUCKET)
LIMITS_STREAM = kv_stream(LIMITS_BUCKET)
OBJECT_STREAM = object_stream(OBJECT_BUCKET)
SHAPING_STREAM = kv_stream(SHAPING_BUCKET)


@dataclass(frozen=True)
class Use:
    """One stream a component uses. Every use may look the stream up (STREAM.INFO)."""

    stream: str
    # Subjects it stores into the stream.
    publish: tuple[str, ...] = ()
    # Gets and consumers (with their acknowledgements and flow control).
    read: bool = True
    # Deleting messages, purging subjects.
    remove: bool = False
    # Creating it when missing, and (the layout's owner) converging its configuration.
    create: bool = False
    # Finding its name by subject (STREAM.NAMES, stream names only): nats-py does to
    # read an object's chunks.
    find: bool = False


# Delivery's shared slots and slow-down state per destination site, which a
# delivery process that comes first creates too.
_SHAPING = Use(SHAPING_STREAM, (f"$KV.{SHAPING_BUCKET}.>",), create=True)
# The queue creates the bucket with the layout and reads it (`kurrier queue sites`).
_SHAPING_READ = Use(SHAPING_STREAM, create=True)

# The message state: the queue's, all of it.
_QUEUE_STATE = (
    Use(BODIES_STREAM, ("kurrier.body.*",), remove=True, create=True),
    Use(OBJECT_STREAM, (f"$O.{OBJECT_BUCKET}.>",), remove=True, create=True, find=True),
    Use(MESSAGES_STREAM, (f"$KV.{MESSAGES_BUCKET}.>",), remove=True, create=True),
    Use(DISPATCH_STREAM, (dispatch_subject("*"),), remove=True, create=True),
    Use(EARLIER_DISPATCH_STREAM, (earlier_dispatch_subject("*"),), remove=True, create=True),
    Use(JOBS_STREAM, ("kurrier.job.*", "kurrier.due.*", "kurrier.schedule.*"), True, True, True),
    Use(RESULTS_STREAM, ("kurrier.result.*",), remove=True, create=True),
    Use(OUTCOMES_STREAM, (outcome_subject("*"),), remove=True, create=True),
    Use(LEASES_STREAM, (f"$KV.{LEASES_BUCKET}.>",), remove=True, create=True),
    _SHAPING_READ,
    # Reads every message's history back (MessageHistory).
    Use(HISTORY_STREAM, (history_subjects("queue"),), create=True),
)


def _history_of(component: str) -> Use:
    """Storing its own messages' history, on its own subjects (core/history.py)."""
    return Use(HISTORY_STREAM, (history_subjects(component),), read=False)


COMPONENTS: dict[str, tuple[Use, ...]] = {
    # The routing table, read-only; the limits every replica shares
    # (core/cluster_counters.py), which it may create too: a queue of an
    # earlier release, during an upgrade, does not. Mail reaches the queue over gRPC.
    "ingress": (
        Use(CONFIG_STREAM),
        Use(LIMITS_STREAM, (f"$KV.{LIMITS_BUCKET}.>",), create=True),
        _history_of("ingress"),
    ),
    # Writes the routing table, nothing else.
    "operator": (Use(CONFIG_STREAM, (f"$KV.{CONFIG_BUCKET}.{ROUTING_TABLE_KEY}",), create=True),),
    # Takes jobs, reads bodies and records, reports results, and ends a
    # message it delivered completely: its record and body. It creates the
    # jobs and outcomes streams when an earlier release's queue, which has
    # not, still runs (delivery rolls first), and takes earlier queues' jobs
    # from where they put them (EARLIER_JOBS).
    # Each component keeps what its earlier release may do, so that pods of
    # that release run under these permissions while an upgrade rolls.
    "delivery": (
        Use(DISPATCH_STREAM, create=True),
        Use(EARLIER_DISPATCH_STREAM, create=True),
        Use(JOBS_STREAM, remove=True),
        Use(RESULTS_STREAM, ("kurrier.result.*",), read=False),
        Use(OUTCOMES_STREAM, (outcome_subject("*"),), read=False, create=True),
        Use(BODIES_STREAM, remove=True),
        Use(OBJECT_STREAM, (f"$O.{OBJECT_BUCKET}.M.>",), remove=True, find=True),
        Use(MESSAGES_STREAM, (f"$KV.{MESSAGES_BUCKET}.>",), remove=True),
        Use(CONFIG_STREAM),
        _SHAPING,
        _history_of("delivery"),
    ),
    # Everything else: it owns the layout and the messages; it reads the table.
    # It converges the limits' bucket with the rest and reads none of it.
    "queue": (
        *_QUEUE_STATE,
        Use(CONFIG_STREAM, create=True),
        Use(LIMITS_STREAM, read=False, create=True),
    ),
}


def _allowed_publish(use: Use) -> list[str]:
    stream = use.stream
    subjects = [f"{API}.STREAM.INFO.{stream}"]
    if use.read:
        subjects += [
            f"{API}.DIRECT.GET.{stream}",
            f"{API}.DIRECT.GET.{stream}.>",
            f"{API}.STREAM.MSG.GET.{stream}",
            f"{API}.CONSUMER.CREATE.{stream}",
            f"{API}.CONSUMER.CREATE.{stream}.>",
            f"{API}.CONSUMER.DURABLE.CREATE.{stream}.>",
            f"{API}.CONSUMER.INFO.{stream}.>",
            f"{API}.CONSUMER.DELETE.{stream}.>",
            f"{API}.CONSUMER.MSG.NEXT.{stream}.>",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    if use.remove:
        subjects += [f"{API}.STREAM.MSG.DELETE.{stream}", f"{API}.STREAM.PURGE.{stream}"]
    if use.create:
        subjects += [f"{API}.STREAM.CREATE.{stream}", f"{API}.STREAM.UPDATE.{stream}"]
    if use.find:
        subjects.append(f"{API}.STREAM.NAMES")
    return subjects + list(use.publish)


def permissions(component: str) -> dict[str, Any]:
    """The component's permissions in nats-server's configuration form (JSON is valid there)."""
    publish = [subject for use in COMPONENTS[component] for subject in _allowed_publish(use)]
    return {
        "publish": {"allow": publish},
        "subscribe": {"allow": [f"{inbox_prefix(component)}.>"]},
    }


def streams_created(component: str) -> frozenset[str]:
    return frozenset(use.stream for use in COMPONENTS[component] if use.create)


def streams_used(component: str) -> frozenset[str]:
    return frozenset(use.stream for use in COMPONENTS[component])


def chart_permissions() -> str:
    """charts/kurrier/files/nats-permissions.json: every component's permissions."""
    return json.dumps({name: permissions(name) for name in COMPONENTS}, indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(chart_permissions())
