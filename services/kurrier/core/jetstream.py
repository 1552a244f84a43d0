"""The JetStream layout kurrier keeps its state in, and the connection to NATS.

The queue creates the layout at start (`ensure_layout`, idempotent); the
operator may create the routing table's bucket; every other service waits for
the streams it uses (`wait_for_layout`), so no service has to start first.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from kurrier.core.durations import parse_duration
from kurrier.core.lifecycle import cancel_and_wait
from kurrier.core.settings import (
    HISTORY_MAX_BYTES,
    HISTORY_RETENTION,
    NATS_CREDS,
    NATS_NKEY,
    NATS_PASSWORD_FILE,
    NATS_TLS_CA,
    NATS_USER,
)
from kurrier.core.sizes import parse_size
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import (
    ConnectionClosedError,
    ConnectionReconnectingError,
    NoRespondersError,
    OutboundBufferLimitError,
    StaleConnectionError,
)
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    PersistMode,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import (
    APIError,
    BadRequestError,
    FetchTimeoutError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

log = logging.getLogger(__name__)

# JetStream did not answer, as opposed to answering no: a cluster electing a
# stream's leader, a node still catching up after a restart. Worth asking again.
# A publish that nobody answers raises NoStreamResponseError (a stream with no
# leader yet: kurrier's streams are made before anything publishes to them).
JETSTREAM_UNANSWERED = (
    TimeoutError,
    NoRespondersError,
    NoStreamResponseError,
    ServiceUnavailableError,
)
# What a request meets while its server is away and the client reconnects
# (nothing is buffered meanwhile: connect's pending_size=0): a passing state
# to wait out, not a fault of the request.
NATS_AWAY = (
    *JETSTREAM_UNANSWERED,
    OutboundBufferLimitError,
    ConnectionClosedError,
    ConnectionReconnectingError,
    StaleConnectionError,
)
ASK_AGAIN_FIRST = 1.0
ASK_AGAIN_LONGEST = 8.0
# A server that stops answering but keeps its connections open (a frozen VM, a
# process stopped, a disk that hangs every write) is left for another once more
# than this many pings this far apart go unanswered, about 15 s; nats-py's
# defaults (2 minutes, 2) left every service on it stalled for over six minutes.
PING_INTERVAL = 5
MAX_OUTSTANDING_PINGS = 2

T = TypeVar("T")


def storage_full(error: BaseException) -> bool:
    """Whether JetStream refused a write for want of room: its storage, or a stream's
    byte limit (`--body-store-limit`)."""
    return isinstance(error, APIError) and (
        error.err_code == _INSUFFICIENT_RESOURCES or "exceeded" in (error.description or "")
    )


async def when_answered(request: Callable[[], Awaitable[T]], what: str) -> T:
    """request()'s result, asked again while JetStream does not answer
    (JETSTREAM_UNANSWERED), doubling the pause from ASK_AGAIN_FIRST to
    ASK_AGAIN_LONGEST, with a warning each time.

    For the steps a process takes once, at its start: the layout, its
    consumers. A process that exited instead would leave its clients nobody
    to reconnect to until something restarted it.
    """
    pause = ASK_AGAIN_FIRST
    while True:
        try:
            return await request()
        except JETSTREAM_UNANSWERED as error:
            log.warning(
                "JetStream does not answer yet (%s); trying again in %.0fs: %r", what, pause, error
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, ASK_AGAIN_LONGEST)


# JetStream's error code for a stream whose limits the store cannot reserve.
_INSUFFICIENT_STORAGE = 10047
# And for a write its storage has no room for.
_INSUFFICIENT_RESOURCES = 10023
# And for a stream configuration it refuses, a change of persist mode among them.
_INVALID_STREAM_CONFIG = 10052

# Bodies up to this size are one stream message; larger ones go to the object
# store in chunks. It stays under NATS's default 1 MiB max_payload.
INLINE_BODY_LIMIT = 900 * 1024

BODIES_STREAM = "KURRIER_BODIES"
# Delivery jobs. Limits retention: delivery's acknowledgement only moves its
# consumer's state, which nats-server writes about ten times a second, where
# removing the job would be one more synced write per message. The queue
# purges what lies below the consumer's ack floor (queue/acked_cleanup.py).
# On one node its writes are not synced one by one (unsynced_jobs).
DISPATCH_STREAM = "KURRIER_DELIVERY_JOBS"
# Where an earlier release's queue puts its jobs (kurrier.dispatch.<id>, synced
# on one node too); delivery takes them from there too (delivery/worker.py).
EARLIER_DISPATCH_STREAM = "KURRIER_DISPATCH"
# How long a dispatched recipient may go without a result before the queue
# dispatches it again (queue/sweeper.py). It covers a job lost in a crash
# between storing a record and publishing its job; it must exceed the longest
# backlog wait. A job is kept no longer: past it, it would only go out twice.
JOB_LEASE = 900.0
# Due notices and retry schedules; also where the queue of a release before
# EARLIER_DISPATCH_STREAM's puts its jobs (kurrier.job.<id>), which delivery
# takes from there too.
JOBS_STREAM = "KURRIER_JOBS"
# Delivery's results, when a job cannot finish its message itself
# (delivery/completion.py): a deferral, a bounce, a split. A work queue, where
# each acknowledgement is a synced removal; queues of earlier releases read
# only this one, so their jobs' results go here (DeliveryJob.batched_results).
RESULTS_STREAM = "KURRIER_RESULTS"
# The same results kept by limits retention, as the jobs are: the queue's
# acknowledgement writes nothing, and the queue purges below its consumer's
# ack floor. No age limit: a result read late is still the only word on what
# its attempt did.
OUTCOMES_STREAM = "KURRIER_OUTCOMES"
HISTORY_STREAM = "KURRIER_HISTORY"
HISTORY_SUBJECTS = "kurrier.history.>"
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
# The token buckets every process shares (core/cluster_counters.py).
LIMITS_BUCKET = "kurrier-limits"
# Delivery's cluster-wide slots per destination site (core/cluster_slots.py) and
# the sites' slow-down state; a site not written to for this long is forgotten.
SHAPING_BUCKET = "kurrier-shaping"
SHAPING_TTL = 3600.0
ROUTING_TABLE_KEY = "routing-table"
DELIVERY_CONSUMER = "delivery"
RESULTS_CONSUMER = "queue-results"
OUTCOMES_CONSUMER = "queue-outcomes"
DUE_CONSUMER = "queue-due"


def kv_stream(bucket: str) -> str:
    """The stream behind a KV bucket (NATS ADR-8)."""
    return f"KV_{bucket}"


def object_stream(bucket: str) -> str:
    """The stream behind an object store (NATS ADR-20)."""
    return f"OBJ_{bucket}"


def inbox_prefix(user: str) -> str:
    """Where a user's replies arrive; each user may subscribe to its own inbox only."""
    return f"_INBOX.{user}"


# Every stream of the layout, in the order ensure_layout creates them.
LAYOUT = (
    BODIES_STREAM,
    DISPATCH_STREAM,
    EARLIER_DISPATCH_STREAM,
    JOBS_STREAM,
    RESULTS_STREAM,
    OUTCOMES_STREAM,
    HISTORY_STREAM,
    MESSAGES_STREAM,
    kv_stream(CONFIG_BUCKET),
    kv_stream(LEASES_BUCKET),
    kv_stream(LIMITS_BUCKET),
    kv_stream(SHAPING_BUCKET),
    object_stream(OBJECT_BUCKET),
)


@dataclass(frozen=True)
class HistoryLimits:
    """How long (seconds) and how much (bytes) of the messages' history is kept."""

    max_age: float = parse_duration(str(HISTORY_RETENTION.default))
    max_bytes: int = parse_size(str(HISTORY_MAX_BYTES.default))


def history_subjects(service: str) -> str:
    """Where a service's processes store their history batches, one subject each."""
    return f"kurrier.history.{service}.*"


def body_subject(queue_id: str) -> str:
    return f"kurrier.body.{queue_id}"


def dispatch_subject(queue_id: str) -> str:
    """Where the queue puts a message's delivery jobs."""
    return f"kurrier.deliver.{queue_id}"


def earlier_dispatch_subject(queue_id: str) -> str:
    """Where an earlier release's queue puts delivery jobs (in EARLIER_DISPATCH_STREAM)."""
    return f"kurrier.dispatch.{queue_id}"


def job_subject(queue_id: str) -> str:
    """Where the release before that put delivery jobs (in JOBS_STREAM)."""
    return f"kurrier.job.{queue_id}"


# Where earlier releases' queues put their jobs, oldest first; delivery takes
# jobs from each while such a queue may still run.
EARLIER_JOBS: tuple[tuple[str, Callable[[str], str]], ...] = (
    (JOBS_STREAM, job_subject),
    (EARLIER_DISPATCH_STREAM, earlier_dispatch_subject),
)


def unsynced_jobs(replicas: int) -> bool:
    """Whether the jobs stream is stored without a sync per write: on one node.

    A job is derived from its record, which is synced before the message is
    accepted: a job a power cut takes is dispatched again from the record by
    the sweeper (DISPATCH_GRACE), and one it brings back after its message
    finished is recognised by delivery (STALE_JOB, delivery/worker.py). The
    jobs' own syncs, and their consumer's, cost CPU and disk: without them
    0.89x-0.97x the CPU per message (bench/results/2026-12-07-jobs-stream-
    unsynced.md). nats-server takes such a stream (its async persist mode)
    neither replicated nor with atomic batches. With replicas every write of
    every stream is on a majority before it is acknowledged.
    """
    return replicas == 1


def result_subject(queue_id: str) -> str:
    """Where delivery put a message's results in the work queue (RESULTS_STREAM)."""
    return f"kurrier.result.{queue_id}"


def outcome_subject(queue_id: str) -> str:
    """Where delivery puts a message's results to be acknowledged in batches."""
    return f"kurrier.outcome.{queue_id}"


def due_subject(queue_id: str) -> str:
    """Where 'this message needs attention now' lands for the queue."""
    return f"kurrier.due.{queue_id}"


def schedule_subject(queue_id: str) -> str:
    """The message's one pending retry schedule; publishing replaces it (NATS ADR-51,
    JetStream message scheduler: the last message on a schedule subject is the schedule)."""
    return f"kurrier.schedule.{queue_id}"


def _login(url: str, user: str | None, password: str | None) -> dict[str, Any]:
    """How to authenticate: the user given, else KURRIER_NATS_USER with the password in
    KURRIER_NATS_PASSWORD_FILE, else a user in the URL (nats://user:pass@host), a
    credentials file (JWT + nkey seed) or an nkey seed file named in the environment;
    and KURRIER_NATS_TLS_CA to verify the servers' certificates."""
    if user is None and os.environ.get(NATS_USER.variable):
        user = os.environ[NATS_USER.variable]
        password_file = os.environ.get(NATS_PASSWORD_FILE.variable)
        if not password_file:
            raise ValueError(f"{NATS_USER.variable} needs {NATS_PASSWORD_FILE.variable}")
        password = Path(password_file).read_text().strip()
    login: dict[str, Any] = {
        "user_credentials": os.environ.get(NATS_CREDS.variable) or None,
        "nkeys_seed": os.environ.get(NATS_NKEY.variable) or None,
    }
    if user is not None:
        login |= {"user": user, "password": password}
    inbox_user = user or urlsplit(url.split(",")[0]).username
    if inbox_user:
        login["inbox_prefix"] = inbox_prefix(inbox_user)
    ca = os.environ.get(NATS_TLS_CA.variable)
    if ca:
        login["tls"] = ssl.create_default_context(cafile=ca)
    return login


async def connect(
    url: str, name: str, user: str | None = None, password: str | None = None
) -> NATS:
    """Connect with endless reconnects and no client-side publish buffer.

    A buffered publish would look sent while NATS is away; with the buffer off
    a publish during an outage fails at once, so ingress answers 451 instead of
    pretending. user and password: see _login.
    """
    login = _login(url, user, password)

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
        ping_interval=PING_INTERVAL,
        max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **login,
    )
    return nc


async def disconnect(nc: NATS) -> None:
    """Close at shutdown. Not drain: every publish of ours is already acknowledged,
    and draining waits on pull subscriptions, or forever on an absent server."""
    await nc.close()
    # nats-py cancels its reconnect loop once, which is not always enough
    # (cancel_and_wait says why); a loop left running reconnects after close.
    if nc._reconnection_task is not None:
        await cancel_and_wait(nc._reconnection_task, again_after=1)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig, owner: bool) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Exists with another configuration (replicas or limits changed): the
        # queue, which owns the layout, converges it; the others take it as is.
        if owner:
            await js.update_stream(config)


async def _ensure_jobs_stream(js: JetStreamContext, config: StreamConfig, owner: bool) -> None:
    """The jobs stream, whose persist mode nats-server fixes when it is created.

    A change of replicas that needs another persist mode (one node to three)
    is refused: the stream stays as it is, which is said once at start with
    what to do, rather than keep the queue from starting. A stream that could
    not be made at all is an error like any other: no job could be stored.
    """
    name = str(config.name)
    try:
        await _ensure_stream(js, config, owner)
    except APIError as refused:
        if refused.err_code != _INVALID_STREAM_CONFIG or not await _exists(js, name):
            raise
        log.error(
            "%s keeps its configuration (%s): its persist mode is fixed when it is "
            "created. To have it made for %d replicas, remove it (`nats stream rm %s`) "
            "and restart the queue, then delivery; the sweeper dispatches its jobs "
            "again from their records within minutes",
            name,
            refused.description,
            config.num_replicas,
            name,
        )


async def _exists(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except NotFoundError:
        return False
    return True


async def _converge_replicas(
    js: JetStreamContext, stream: str, replicas: int, allow_atomic: bool = False
) -> None:
    """KV buckets and object stores are streams too: scale them with the rest."""
    info = await js.stream_info(stream)
    wanted = info.config.evolve(
        num_replicas=replicas, allow_atomic=allow_atomic or info.config.allow_atomic
    )
    if wanted != info.config:
        await js.update_stream(wanted)


def _records_stream(replicas: int) -> StreamConfig:
    """The records' bucket: a KV bucket's stream as NATS ADR-8 lays it out (history 1,
    removals by rollup, markers with a TTL), which also takes atomic batches
    (core/atomic_batches.py). nats-py's create_key_value has no way to ask for those."""
    return StreamConfig(
        name=MESSAGES_STREAM,
        subjects=[RECORDS_PREFIX + ">"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        discard=DiscardPolicy.NEW,
        duplicate_window=120.0,
        allow_direct=True,
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        allow_atomic=True,
    )


async def ensure_layout(
    js: JetStreamContext,
    replicas: int = 1,
    *,
    owner: bool = False,
    body_store_limit: int | None = None,
    streams: Collection[str] | None = None,
    history: HistoryLimits | None = None,
) -> None:
    """Create kurrier's streams, KV buckets and object store if missing.

    streams: only these (by stream name, as LAYOUT names them); None: all.
    body_store_limit caps the bytes of stored bodies (stream and object
    store alike). Set below the JetStream storage, it keeps headroom for the
    small writes (records, jobs, results) that let the queue drain and free
    space once it is full: without it a full disk could not even record a
    delivery.

    history bounds the messages' history by age and size (the owner's
    settings).
    """
    wanted = LAYOUT if streams is None else [name for name in LAYOUT if name in streams]
    if BODIES_STREAM in wanted:
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
    if DISPATCH_STREAM in wanted:
        unsynced = unsynced_jobs(replicas)
        await _ensure_jobs_stream(
            js,
            StreamConfig(
                name=DISPATCH_STREAM,
                subjects=[dispatch_subject("*")],
                storage=StorageType.FILE,
                num_replicas=replicas,
                max_age=JOB_LEASE,
                allow_atomic=not unsynced,
                persist_mode=PersistMode.ASYNC if unsynced else None,
            ),
            owner,
        )
    if EARLIER_DISPATCH_STREAM in wanted:
        await _ensure_stream(
            js,
            StreamConfig(
                name=EARLIER_DISPATCH_STREAM,
                subjects=[earlier_dispatch_subject("*")],
                storage=StorageType.FILE,
                num_replicas=replicas,
                max_age=JOB_LEASE,
                allow_atomic=True,
            ),
            owner,
        )
    # Retries are server-side message schedules: the time a deferred message is
    # due lives in JetStream itself and fires into kurrier.due.* whichever
    # queue process is alive then.
    if JOBS_STREAM in wanted:
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
    if RESULTS_STREAM in wanted:
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
    if OUTCOMES_STREAM in wanted:
        await _ensure_stream(
            js,
            StreamConfig(
                name=OUTCOMES_STREAM,
                subjects=[outcome_subject("*")],
                storage=StorageType.FILE,
                num_replicas=replicas,
            ),
            owner,
        )
    if HISTORY_STREAM in wanted:
        # Best-effort and bounded: the oldest batches go first, by age or size.
        history = history or HistoryLimits()
        try:
            await _ensure_stream(
                js,
                StreamConfig(
                    name=HISTORY_STREAM,
                    subjects=[HISTORY_SUBJECTS],
                    storage=StorageType.FILE,
                    num_replicas=replicas,
                    max_age=history.max_age,
                    max_bytes=history.max_bytes,
                    discard=DiscardPolicy.OLD,
                ),
                owner,
            )
        except APIError as error:
            if error.err_code != _INSUFFICIENT_STORAGE:
                raise
            # JetStream reserves a stream's max_bytes up front: on a small store
            # the history must not keep the mail path from starting.
            log.error(
                "no message history: JetStream cannot reserve %d bytes for %s; "
                "lower --history-max-bytes",
                history.max_bytes,
                HISTORY_STREAM,
            )
    # The limits' buckets are in memory: lost, they only start full again, and
    # their writes (one per batch of tokens) need no sync to disk. Their entries
    # expire one by one (per-message TTL), so the bucket has no TTL of its own.
    # The shaping's slots, lost, start free again; their keys expire by the bucket's TTL.
    for bucket, ttl, storage in (
        (MESSAGES_BUCKET, None, StorageType.FILE),
        (CONFIG_BUCKET, None, StorageType.FILE),
        (LEASES_BUCKET, LEASE_TTL, StorageType.FILE),
        (LIMITS_BUCKET, None, StorageType.MEMORY),
        (SHAPING_BUCKET, SHAPING_TTL, StorageType.MEMORY),
    ):
        if kv_stream(bucket) not in wanted:
            continue
        records = bucket == MESSAGES_BUCKET
        try:
            await js.key_value(bucket)
            if owner:
                await _converge_replicas(js, kv_stream(bucket), replicas, allow_atomic=records)
        except NotFoundError:
            if records:
                await js.add_stream(_records_stream(replicas))
                continue
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket, storage=storage, replicas=replicas, history=1, ttl=ttl
                )
            )
    if object_stream(OBJECT_BUCKET) not in wanted:
        return
    try:
        await js.object_store(OBJECT_BUCKET)
        if owner:
            await _converge_replicas(js, object_stream(OBJECT_BUCKET), replicas)
    except NotFoundError:
        await js.create_object_store(
            OBJECT_BUCKET,
            ObjectStoreConfig(
                storage=StorageType.FILE, replicas=replicas, max_bytes=body_store_limit or -1
            ),
        )


async def wait_for_layout(
    js: JetStreamContext, streams: Collection[str], poll: float = 0.1
) -> None:
    """Until these streams exist: those a component uses but may not create (the
    queue creates them). Not the history, which is best-effort and may be
    missing for good (a store too small for its limit).

    Asked often: services start together, `kurrier up` says ready once the
    queue serves (right after it created the layout), and mail accepted
    until delivery starts waits for it. Logged only when what is missing
    changes.
    """
    missing = set(streams) - {HISTORY_STREAM}
    logged: set[str] = set()
    while True:
        for stream in sorted(missing):
            try:
                await js.stream_info(stream)
                missing.discard(stream)
            except NotFoundError:
                pass
        if not missing:
            return
        if missing != logged:
            log.info("waiting for the queue to create %s", ", ".join(sorted(missing)))
            logged = set(missing)
        await asyncio.sleep(poll)


# A pass's consumer is transient: dropped by the server if its reader dies.
PASS_CONSUMER_INACTIVE = 5.0
PASS_BATCH = 256


async def one_pass(
    js: JetStreamContext,
    subjects: str,
    stream: str,
    deliver_policy: DeliverPolicy,
    start: datetime.datetime | None = None,
    until_sequence: int | None = None,
) -> AsyncIterator[Msg]:
    """Every message the consumer counts when created, in one streamed pass.

    A pull consumer, not nats-py's watcher: the watcher decides that a stream
    is empty from consumer info, which nats-server may answer before the
    deliveries it already counted arrive, and then ends a pass over a full
    stream at once (tests/queue/test_record_passes.py). A pull consumer
    delivers nothing until asked, so its first count is the whole pass. It
    is one replica in memory, and removed at the end rather than after its
    inactivity: a caller polling passes several times a second would pile
    them up. until_sequence ends the pass at that stream sequence.
    """
    subscription = await js.pull_subscribe(
        subjects,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=deliver_policy,
            opt_start_time=start,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=PASS_CONSUMER_INACTIVE,
            num_replicas=1,
            mem_storage=True,
        ),
    )
    consumer = None
    try:
        info = await subscription.consumer_info()
        consumer, remaining = info.name, info.num_pending or 0
        while remaining > 0:
            try:
                batch = await subscription.fetch(min(remaining, PASS_BATCH), timeout=1)
            except (FetchTimeoutError, TimeoutError):
                # What was counted may have been removed meanwhile: count again.
                remaining = (await subscription.consumer_info()).num_pending or 0
                continue
            for message in batch:
                remaining = message.metadata.num_pending
                yield message
                if (
                    until_sequence is not None
                    and message.metadata.sequence.stream >= until_sequence
                ):
                    remaining = 0
                    break
    finally:
        await subscription.unsubscribe()
        if consumer is not None:
            with contextlib.suppress(NatsError):
                await js.delete_consumer(stream, consumer)


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
