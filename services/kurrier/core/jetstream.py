"""The JetStream layout kurrier keeps its state in, and the connection to NATS.

Every service calls `ensure_layout` at start; it is idempotent, so no service
has to start first.
"""

from __future__ import annotations

import asyncio
import logging
import os

from kurrier.core.settings import NATS_CREDS, NATS_NKEY
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, FetchTimeoutError, NotFoundError

log = logging.getLogger(__name__)

# Bodies up to this size are one stream message; larger ones go to the object
# store in chunks. It stays under NATS's default 1 MiB max_payload.
INLINE_BODY_LIMIT = 900 * 1024

BODIES_STREAM = "KURRIER_BODIES"
JOBS_STREAM = "KURRIER_JOBS"
RESULTS_STREAM = "KURRIER_RESULTS"
MESSAGES_BUCKET = "kurrier-messages"
# The records bucket as JetStream names a KV bucket's stream and subjects
# (NATS ADR-8, JetStream based Key-Value Stores), for the places that go past
# nats-py's KV API: a guarded purge, a pass by pull consumer.
MESSAGES_STREAM = f"KV_{MESSAGES_BUCKET}"
RECORDS_PREFIX = f"$KV.{MESSAGES_BUCKET}."
OBJECT_BUCKET = "kurrier-bodies"
CONFIG_BUCKET = "kurrier-config"
LEASES_BUCKET = "kurrier-leases"
# A lease not refreshed for this long is free for another process to take.
LEASE_TTL = 30.0
ROUTING_TABLE_KEY = "routing-table"
DELIVERY_CONSUMER = "delivery"
RESULTS_CONSUMER = "queue-results"
DUE_CONSUMER = "queue-due"


def body_subject(queue_id: str) -> str:
    return f"kurrier.body.{queue_id}"


def job_subject(queue_id: str) -> str:
    return f"kurrier.job.{queue_id}"


def result_subject(queue_id: str) -> str:
    return f"kurrier.result.{queue_id}"


def due_subject(queue_id: str) -> str:
    """Where 'this message needs attention now' lands for the queue."""
    return f"kurrier.due.{queue_id}"


def schedule_subject(queue_id: str) -> str:
    """The message's one pending retry schedule; publishing replaces it (NATS ADR-51,
    JetStream message scheduler: the last message on a schedule subject is the schedule)."""
    return f"kurrier.schedule.{queue_id}"


async def connect(url: str, name: str) -> NATS:
    """Connect with endless reconnects and no client-side publish buffer.

    A buffered publish would look sent while NATS is away; with the buffer off
    a publish during an outage fails at once, so ingress answers 451 instead of
    pretending.
    """

    nc = NATS()

    async def on_error(error: Exception) -> None:
        # One line per failed (re)connect; nats-py's default logs a whole traceback.
        log.warning("NATS: %r", error)

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("NATS connection lost; reconnecting")

    async def on_reconnect() -> None:
        log.info("NATS connection restored")

    await nc.connect(
        servers=url.split(","),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        pending_size=0,
        connect_timeout=2,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        # User and password go in the URL (nats://user:pass@host); a credentials
        # file (JWT + nkey seed) or an nkey seed file are named in the environment.
        user_credentials=os.environ.get(NATS_CREDS.variable) or None,
        nkeys_seed=os.environ.get(NATS_NKEY.variable) or None,
    )
    return nc


async def disconnect(nc: NATS) -> None:
    """Close at shutdown. Not drain: every publish of ours is already acknowledged,
    and draining waits on pull subscriptions, or forever on an absent server."""
    await nc.close()


async def _ensure_stream(js: JetStreamContext, config: StreamConfig, owner: bool) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Exists with another configuration (replicas or limits changed): the
        # queue, which owns the layout, converges it; the others take it as is.
        if owner:
            await js.update_stream(config)


async def _converge_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """KV buckets and object stores are streams too: scale them with the rest."""
    info = await js.stream_info(stream)
    if info.config.num_replicas != replicas:
        await js.update_stream(info.config.evolve(num_replicas=replicas))


async def ensure_layout(
    js: JetStreamContext,
    replicas: int = 1,
    *,
    owner: bool = False,
    body_store_limit: int | None = None,
) -> None:
    """Create kurrier's streams, KV buckets and object store if missing.

    body_store_limit caps the bytes of stored bodies (stream and object
    store alike). Set below the JetStream storage, it keeps headroom for the
    small writes (records, jobs, results) that let the queue drain and free
    space once it is full: without it a full disk could not even record a
    delivery.
    """
    await _ensure_stream(
        js,
        StreamConfig(
            name=BODIES_STREAM,
            subjects=["kurrier.body.*"],
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_msgs_per_subject=1,
            max_bytes=body_store_limit or -1,
            allow_direct=True,
            discard=DiscardPolicy.NEW,
        ),
        owner,
    )
    # Retries are server-side message schedules: the time a deferred message is
    # due lives in JetStream itself and fires into kurrier.due.* whichever
    # queue process is alive then.
    await _ensure_stream(
        js,
        StreamConfig(
            name=JOBS_STREAM,
            subjects=["kurrier.job.*", "kurrier.due.*", "kurrier.schedule.*"],
            storage=StorageType.FILE,
            num_replicas=replicas,
            retention=RetentionPolicy.WORK_QUEUE,
            allow_msg_schedules=True,
        ),
        owner,
    )
    await _ensure_stream(
        js,
        StreamConfig(
            name=RESULTS_STREAM,
            subjects=["kurrier.result.*"],
            storage=StorageType.FILE,
            num_replicas=replicas,
            retention=RetentionPolicy.WORK_QUEUE,
            discard=DiscardPolicy.NEW,
        ),
        owner,
    )
    for bucket, ttl in ((MESSAGES_BUCKET, None), (CONFIG_BUCKET, None), (LEASES_BUCKET, LEASE_TTL)):
        try:
            await js.key_value(bucket)
            if owner:
                await _converge_replicas(js, f"KV_{bucket}", replicas)
        except NotFoundError:
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket, storage=StorageType.FILE, replicas=replicas, history=1, ttl=ttl
                )
            )
    try:
        await js.object_store(OBJECT_BUCKET)
        if owner:
            await _converge_replicas(js, f"OBJ_{OBJECT_BUCKET}", replicas)
    except NotFoundError:
        await js.create_object_store(
            OBJECT_BUCKET,
            ObjectStoreConfig(
                storage=StorageType.FILE, replicas=replicas, max_bytes=body_store_limit or -1
            ),
        )


async def pull_batch(
    subscription: JetStreamContext.PullSubscription, batch: int, timeout: float
) -> list[Msg]:
    """The next messages of a pull consumer; [] when none came or JetStream is briefly away.

    Node loss, leader elections and restarts surface as errors from fetch; the
    messages wait in JetStream meanwhile, so the consumer waits too instead of
    dying.
    """
    try:
        return list(await subscription.fetch(batch=batch, timeout=timeout))
    except (FetchTimeoutError, TimeoutError):
        return []
    except NatsError as error:
        log.warning("fetching from JetStream failed, retrying: %r", error)
        await asyncio.sleep(1.0)
        return []
