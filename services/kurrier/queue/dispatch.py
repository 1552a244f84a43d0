"""Turning a message's due recipients into delivery jobs, one per route."""

from __future__ import annotations

from kurrier.core.atomic_batches import AtomicBatches
from kurrier.core.history import HISTORY, trace_id_of
from kurrier.core.jetstream import JOB_LEASE, dispatch_subject
from kurrier.core.message import DeliveryJob, MessageRecord, RecipientDsn
from kurrier.core.routing import RoutingTable, domain_of
from kurrier.core.settings import BATCHED_RESULTS_BY_DEFAULT
from kurrier.core.telemetry import JOBS_DESTINATION, publishing


def group_by_route(
    table: RoutingTable, mail_from: str, recipients: list[str], tenant: str = ""
) -> list[list[str]]:
    """Recipients split so that each group goes to one of tenant's routes (unrouted
    ones together)."""
    sender_domain = domain_of(mail_from)
    groups: dict[str, list[str]] = {}
    for recipient in recipients:
        route = table.route_for(domain_of(recipient), sender_domain, tenant)
        groups.setdefault(route.name if route else "", []).append(recipient)
    return list(groups.values())


def mark_dispatched(record: MessageRecord, recipients: list[str], now: float) -> None:
    """Count an attempt for each recipient and lease it to the job about to be sent."""
    chosen = set(recipients)
    record.dispatches += 1
    for state in record.recipients:
        if state.address in chosen:
            state.status = "queued"
            state.attempts += 1
            state.next_attempt = now + JOB_LEASE


def report_dispatch(record: MessageRecord, recipients: list[str], now: float) -> None:
    """Write a stored dispatch into the history: the counterpart of its job spans
    (`send kurrier.dispatch`, `kurrier.attempt`), called once the record holds it."""
    HISTORY.record(
        record.queue_id,
        "dispatched",
        trace_id=trace_id_of(record.traceparent),
        at=now,
        attempt=record.dispatches,
        recipients=", ".join(recipients),
    )


async def publish_jobs(
    jobs: AtomicBatches,
    table: RoutingTable,
    record: MessageRecord,
    recipients: list[str],
    revision: int,
    batched_results: bool = BATCHED_RESULTS_BY_DEFAULT,
) -> None:
    """Publish the jobs of the record's latest dispatch; idempotent under JetStream dedup.

    revision is the record's as stored with this dispatch. A job that is all
    the message has left to do carries it, so that delivery can finish the
    message without the queue. batched_results: where the jobs' results go
    (DeliveryJob.batched_results).
    """
    groups = group_by_route(table, record.mail_from, recipients, record.tenant)
    pending = {r.address for r in record.pending()}
    sole = len(groups) == 1 and set(groups[0]) == pending and not record.scheduled
    for index, group in enumerate(groups):
        members = set(group)
        job = DeliveryJob(
            queue_id=record.queue_id,
            dispatch=record.dispatches,
            mail_from=record.mail_from,
            recipients=group,
            size=record.size,
            body_store=record.body_store,
            smtputf8=record.smtputf8,
            body_type=record.body_type,
            record_revision=revision if sole else None,
            received_at=record.received_at,
            dsn_ret=record.dsn_ret,
            dsn_envid=record.dsn_envid,
            recipient_dsn={
                r.address: RecipientDsn(notify=r.notify, orcpt=r.orcpt)
                for r in record.recipients
                if r.address in members and (r.notify or r.orcpt)
            },
            # A body attached to the record stays there: delivery reads the record.
            body=None if record.body_attached else record.body,
            require_tls=record.require_tls,
            tenant=record.tenant,
            batched_results=batched_results,
        ).in_oldest_format()
        subject = dispatch_subject(record.queue_id)
        with publishing(
            JOBS_DESTINATION,
            subject,
            {"Nats-Msg-Id": f"job:{record.queue_id}:{record.dispatches}:{index}"},
            queue_id=record.queue_id,
            attempt=record.dispatches,
            traceparent=record.traceparent,
        ) as headers:
            await jobs.publish(subject, job.model_dump_json().encode(), headers)
