"""`kurrier queue list|show|hold|release|delete|retry|flush|history|sites`: postqueue/postsuper
for kurrier, a message trace, and the traffic shaping of destination sites."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from kurrier.cli.progress import Progress
from kurrier.core.dsn_parameters import (
    MailParameters,
    RcptParameters,
    mail_parameters_text,
    rcpt_parameters_text,
)
from kurrier.core.durations import parse_duration
from kurrier.core.grpc_tls import QueueTls, queue_channel
from kurrier.v1 import queue_pb2, queue_pb2_grpc

ACTIONS = {
    "hold": queue_pb2.ACTION_HOLD,
    "release": queue_pb2.ACTION_RELEASE,
    "delete": queue_pb2.ACTION_DELETE,
    "retry": queue_pb2.ACTION_RETRY,
    "flush": queue_pb2.ACTION_RETRY,
}
# Like postqueue -p: '*' marks a message being delivered, '!' one on hold.
STATE_MARK = {"active": "*", "held": "!", "deferred": " "}
RPC_TIMEOUT = 60.0
# Messages per ApplyAction call: each call stays short whatever the number of
# messages, and an operation over more than one call shows its progress.
ACTION_BATCH = 100
# How far back `kurrier queue history --rcpt|--sender` looks unless told.
DEFAULT_HISTORY_SINCE = "1h"


class AdminError(Exception):
    """A failure to tell the user in one line (exit code 1)."""


@dataclass(frozen=True)
class QueueTarget:
    address: str
    tls: QueueTls | None


def queue_target(args: argparse.Namespace, tls: QueueTls | None) -> QueueTarget:
    """The queue named by --queue-address and the --queue-tls-* flags, or else the
    `kurrier up` in --data-dir, with the client certificate it made for its children."""
    if args.queue_address:
        return QueueTarget(str(args.queue_address), tls)
    state_file = Path(args.data_dir) / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        raise AdminError(
            f"no running `kurrier up` in {args.data_dir} (give --data-dir or --queue-address)"
        ) from None
    local_tls = state.get("queue_tls")
    return QueueTarget(
        str(state["queue_address"]), tls or (QueueTls(**local_tls) if local_tls else None)
    )


def queue_filter(args: argparse.Namespace) -> queue_pb2.MessageFilter:
    sender = getattr(args, "sender", None)
    return queue_pb2.MessageFilter(
        queue_ids=getattr(args, "queue_ids", None) or [],
        state=getattr(args, "state", None) or "",
        recipient_domain=getattr(args, "domain", None) or "",
        sender="" if sender in (None, "<>") else sender,
        null_sender=sender == "<>",
        tenant=getattr(args, "tenant", None) or "",
    )


def format_listing(response: queue_pb2.ListMessagesResponse) -> str:
    if not response.messages:
        return "Mail queue is empty"
    lines = ["-Queue ID-            --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    total_size = 0
    for message in response.messages:
        total_size += message.size
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(message.received_at))
        mark = STATE_MARK.get(message.state, " ")
        lines.append(
            f"{message.queue_id}{mark} {message.size:8d} {arrival}  {message.sender or '<>'}"
        )
        for recipient in message.recipients:
            if recipient.status in ("delivered", "bounced", "expired"):
                continue
            if recipient.last_reply:
                lines.append(f"{'':22}({recipient.last_reply})")
            lines.append(f"{'':51}{recipient.address}")
        lines.append("")
    kbytes = (total_size + 1023) // 1024
    lines.append(
        f"-- {kbytes} Kbytes in {response.total} Request{'s' if response.total != 1 else ''}."
    )
    return "\n".join(lines)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _dsn_text(parameters: list[str]) -> str:
    """DSN parameters (RFC 3461) as SMTP writes them, xtext encoded; '-' when none."""
    return " ".join(parameters) or "-"


def format_detail(detail: queue_pb2.MessageDetail) -> str:
    summary = detail.summary
    mail_dsn = MailParameters(ret=detail.dsn_ret, envid=detail.dsn_envid)
    lines = [
        f"Queue ID:     {summary.queue_id}",
        f"State:        {summary.state}",
        f"Sender:       <{summary.sender}>",
        f"Arrival:      {_when(summary.received_at)}",
        f"Size:         {summary.size}",
        f"Client:       {detail.client_address} (HELO {detail.client_helo or '-'}"
        f"{', trusted network' if detail.client_trusted else ''})",
        f"Auth:         {detail.authenticated_as or '-'}",
        f"Tenant:       {summary.tenant or '-'}",
        f"Message-ID:   {detail.message_id_header or '-'}",
        f"DSN:          {_dsn_text(mail_parameters_text(mail_dsn))}",
        f"REQUIRETLS:   {'yes' if detail.require_tls else 'no'}",
        "",
        "Recipients:",
    ]
    for recipient in summary.recipients:
        lines.append(f"  <{recipient.address}> {recipient.status}, {recipient.attempts} attempt(s)")
        if recipient.notify or recipient.orcpt:
            rcpt_dsn = RcptParameters(notify=recipient.notify, orcpt=recipient.orcpt)
            lines.append(f"    {_dsn_text(rcpt_parameters_text(rcpt_dsn))}")
        if recipient.next_attempt:
            lines.append(f"    next attempt {_when(recipient.next_attempt)}")
        for attempt in recipient.history:
            lines.append(f"    {_when(attempt.at)}  {attempt.reply}")
    lines += ["", "Headers:", detail.headers.decode("utf-8", errors="replace").rstrip("\r\n")]
    return "\n".join(lines).replace("\r\n", "\n")


def _history_request(args: argparse.Namespace) -> queue_pb2.HistoryRequest:
    since = args.since or (None if args.queue_id else DEFAULT_HISTORY_SINCE)
    return queue_pb2.HistoryRequest(
        queue_id=args.queue_id or "",
        sender=args.sender or "",
        recipient=args.rcpt or "",
        since=time.time() - parse_duration(since) if since else 0.0,
    )


def _details(details: Any) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(details.items()))


def format_history(response: queue_pb2.HistoryResponse) -> str:
    """A timeline per message, in the order its first events happened."""
    if not response.events:
        return "No history found (it is kept for the queue's --history-retention)"
    by_message: dict[str, list[queue_pb2.HistoryEvent]] = {}
    for event in response.events:
        by_message.setdefault(event.queue_id, []).append(event)
    lines = []
    for queue_id, events in by_message.items():
        trace_id = next((e.trace_id for e in events if e.trace_id), "")
        lines.append(f"{queue_id}  trace {trace_id or '-'}")
        for event in events:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at))
            other_trace = f" trace={event.trace_id}" if event.trace_id not in ("", trace_id) else ""
            lines.append(
                f"  {when}.{int(event.at * 1000) % 1000:03d}  {event.service:<8} "
                f"{event.event:<10} {_details(event.details)}{other_trace}".rstrip()
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _held_of(held: int, allowed: int, configured: int) -> str:
    """held/allowed, and (configured) when it differs; '-' without a limit, when
    delivery counts nothing."""
    if not allowed:
        return "-"
    return (
        f"{held}/{allowed}" if allowed == configured else f"{held}/{allowed} ({configured or '-'})"
    )


def format_sites(response: queue_pb2.ListSitesResponse) -> str:
    """Per site: connections open and messages of the last minute, each against the
    limit allowed now (the configured one in parentheses while slowed down)."""
    if not response.sites:
        return "No site is shaped (none used within the last hour)"
    rows = [("SITE", "CONNECTIONS", "MESSAGES/MIN", "SLOWED DOWN")]
    for site in response.sites:
        rows.append(
            (
                site.name,
                _held_of(site.connections, site.allowed_connections, site.max_connections),
                _held_of(
                    site.messages_last_minute,
                    site.allowed_messages_per_minute,
                    site.messages_per_minute,
                ),
                f"since {_when(site.slowed_since)}" if site.slowed_since else "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + f"  {row[3]}"
        for row in rows
    )


def _as_json(message: Any) -> str:
    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2)


async def call_queue(args: argparse.Namespace, tls: QueueTls | None) -> str:
    """Make the admin call args name; what to print."""
    target = queue_target(args, tls)
    # A listing of a large queue is many MB: lift gRPC's 4 MB default for replies.
    options = [("grpc.max_receive_message_length", -1)]
    async with queue_channel(target.address, target.tls, options) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        try:
            if args.action == "list":
                listing = await stub.ListMessages(
                    queue_pb2.ListMessagesRequest(filter=queue_filter(args)), timeout=RPC_TIMEOUT
                )
                return _as_json(listing) if args.json else format_listing(listing)
            if args.action == "show":
                detail = await stub.GetMessage(
                    queue_pb2.GetMessageRequest(queue_id=args.queue_id), timeout=RPC_TIMEOUT
                )
                return _as_json(detail) if args.json else format_detail(detail)
            if args.action == "history":
                history = await stub.MessageHistory(_history_request(args), timeout=RPC_TIMEOUT)
                return _as_json(history) if args.json else format_history(history)
            if args.action == "sites":
                sites = await stub.ListSites(queue_pb2.ListSitesRequest(), timeout=RPC_TIMEOUT)
                return _as_json(sites) if args.json else format_sites(sites)
            response = await _apply_action(stub, args)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                raise AdminError(f"cannot reach the queue at {target.address}") from None
            raise AdminError(error.details() or error.code().name) from None
    if args.json:
        return _as_json(response)
    return f"{len(response.queue_ids)} message(s) {_done(args.action)}" + "".join(
        f"\n  {queue_id}" for queue_id in response.queue_ids
    )


DONE = {
    "hold": "held",
    "release": "released",
    "delete": "deleted",
    "retry": "scheduled for retry",
    "flush": "scheduled for retry",
}


def _done(action: str) -> str:
    """What the action did to a message, as the summary says it."""
    return DONE[action]


async def _apply_action(
    stub: queue_pb2_grpc.QueueServiceStub, args: argparse.Namespace
) -> queue_pb2.ActionResponse:
    """Act on the named messages, or on every match (listed first), ACTION_BATCH per call.

    The queue ids changed, in the order acted on. A match listed but gone
    (delivered, deleted) by its turn is left alone, as the queue leaves an
    unknown id; one that arrives after the listing is not acted on.
    """
    queue_ids = list(getattr(args, "queue_ids", None) or [])
    if args.action == "flush" or getattr(args, "all", False):
        selector = queue_pb2.MessageFilter(state="deferred") if args.action == "flush" else None
        listing = await stub.ListMessages(
            queue_pb2.ListMessagesRequest(filter=selector or queue_filter(args)),
            timeout=RPC_TIMEOUT,
        )
        queue_ids = [message.queue_id for message in listing.messages]
    progress = None
    if len(queue_ids) > ACTION_BATCH:
        progress = Progress(args.action, len(queue_ids), _done(args.action), sys.stderr)
    changed: list[str] = []
    for start in range(0, len(queue_ids), ACTION_BATCH):
        batch = queue_ids[start : start + ACTION_BATCH]
        response = await stub.ApplyAction(
            queue_pb2.ActionRequest(
                action=ACTIONS[args.action], filter=queue_pb2.MessageFilter(queue_ids=batch)
            ),
            timeout=RPC_TIMEOUT,
        )
        changed += response.queue_ids
        if progress is not None:
            progress.advance(start + len(batch), len(changed))
    if progress is not None:
        progress.finish(len(changed))
    return queue_pb2.ActionResponse(queue_ids=changed)


def check_admin_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line that argparse cannot tell, or None."""
    if args.action is None:
        return "give an action (list, show, history, hold, ...)"
    if args.action == "history" and bool(args.queue_id) == bool(args.rcpt or args.sender):
        return "give a queue id, or --rcpt or --sender"
    if args.action in ("hold", "release", "delete", "retry"):
        if bool(args.queue_ids) == bool(args.all):
            return "give queue ids or --all"
        if args.action == "delete" and args.all and not args.yes:
            return "--all: add --yes to delete every match"
    return None


def run_admin(args: argparse.Namespace, tls: QueueTls | None) -> int:
    usage = check_admin_args(args)
    if usage:
        print(f"kurrier queue {args.action}: {usage}", file=sys.stderr)
        return 2
    try:
        print(asyncio.run(call_queue(args, tls)))
    except AdminError as error:
        print(f"kurrier queue {args.action}: {error}", file=sys.stderr)
        return 1
    return 0
