"""The `kurrier` command: every service's entrypoint plus the local tools.

The services' flags, and the KURRIER_* variables that can stand for them, are
declared in kurrier.core.settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from kurrier.cli.nats_server import sync_interval
from kurrier.core.durations import parse_duration
from kurrier.core.lifecycle import run_service
from kurrier.core.logs import setup_logging
from kurrier.core.settings import (
    DELIVERY,
    INGRESS,
    METRICS_BASE_PORT,
    OPERATOR,
    PASSED_ON_BY_UP,
    QUEUE,
    QUEUE_ADMIN,
    SERVICES,
    add_settings,
    duration,
    existing_file,
    host_port,
)

if TYPE_CHECKING:
    from kurrier.core.grpc_tls import GrpcTls, QueueTls
    from kurrier.ingress.token_review import KubeApiSettings

DEFAULT_DATA_DIR = Path.home() / ".local" / "state" / "kurrier"


class Parser(argparse.ArgumentParser):
    """Usage errors are one line and exit code 2, never a traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_queue_admin(queue: argparse.ArgumentParser, reach_flags: bool = True) -> None:
    """The admin actions; reach_flags adds how to reach the queue and --json, which
    `kubectl kurrier` has no use for (it reaches the queue through the API server
    and prints what -o asks)."""
    admin = queue.add_subparsers(dest="action", parser_class=Parser, metavar="ACTION")
    where = Parser(add_help=False)
    if reach_flags:
        add_settings(where, QUEUE_ADMIN)
        where.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="a `kurrier up`")
        where.add_argument("--json", action="store_true", help="machine-readable output")
    filters = Parser(add_help=False)
    filters.add_argument("--state", choices=("active", "deferred", "held"))
    filters.add_argument("--domain", help="messages with a pending recipient in this domain")
    filters.add_argument("--sender", help="exact sender address ('<>' for bounces)")
    # Not dest "namespace": `kubectl kurrier -n NS` names the release's namespace with it.
    filters.add_argument(
        "--namespace", dest="tenant", help="messages of this namespace (docs/operator.md, Tenancy)"
    )
    listing = admin.add_parser("list", parents=[where, filters], help="list queued messages")
    listing.set_defaults(queue_ids=[])
    show = admin.add_parser("show", parents=[where], help="one message in detail")
    show.add_argument("queue_id")
    for action, text in (
        ("hold", "stop delivering messages until released"),
        ("release", "release held messages"),
        ("delete", "delete messages without delivering or bouncing them"),
        ("retry", "retry deferred messages now"),
    ):
        command = admin.add_parser(action, parents=[where, filters], help=text)
        command.add_argument("queue_ids", nargs="*", metavar="QUEUE_ID")
        command.add_argument("--all", action="store_true", help="every message the filters match")
        if action == "delete":
            command.add_argument("--yes", action="store_true", help="confirm deleting with --all")
    admin.add_parser("flush", parents=[where], help="retry every deferred message now")
    admin.add_parser(
        "sites",
        parents=[where],
        help="traffic shaping per destination site: limits, connections, slow-down",
    )
    history = admin.add_parser(
        "history",
        parents=[where],
        help="what happened to a message, delivered or not: by queue id, sender or recipient",
    )
    history.add_argument("queue_id", nargs="?", help="one message")
    history.add_argument("--rcpt", help="every message to this address")
    history.add_argument("--sender", help="every message from this address ('<>' for bounces)")
    history.add_argument(
        "--since",
        type=duration,
        help="events of the last DURATION only (default: 1h for --rcpt and --sender, "
        "a message's whole history for a queue id)",
    )


def build_parser() -> Parser:
    parser = Parser(prog="kurrier", description="A Kubernetes-native SMTP relay.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    up = commands.add_parser("up", help="run the whole relay locally")
    source = up.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=existing_file, help="resource YAML file")
    source.add_argument(
        "--kubeconfig", type=existing_file, help="take the resources from this cluster instead"
    )
    up.add_argument("--namespace", help="with --kubeconfig: watch only these (comma separated)")
    up.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    add_settings(up, PASSED_ON_BY_UP)
    add_settings(up, [METRICS_BASE_PORT])
    up.add_argument(
        "--nats-cluster",
        type=int,
        choices=(1, 3, 5),
        default=1,
        help="NATS nodes: 3 or 5 run a JetStream cluster with 3 replicas and two of each worker",
    )
    up.add_argument(
        "--nats-sync",
        type=sync_interval,
        help="when JetStream syncs to disk: 'always' (before acknowledging a write; the "
        "default on one node) or a duration such as 2m (NATS's default, and the default in "
        "a cluster, where a majority of nodes holds each write)",
    )

    ingress = commands.add_parser("ingress", help="run the SMTP ingress service")
    add_settings(ingress, INGRESS)
    queue = commands.add_parser(
        "queue", help="run the queue service, or administer the queue (list, show, hold, ...)"
    )
    add_settings(queue, QUEUE)
    add_queue_admin(queue)
    delivery = commands.add_parser("delivery", help="run the delivery service")
    add_settings(delivery, DELIVERY)
    operator = commands.add_parser("operator", help="run the Kubernetes operator")
    add_settings(operator, OPERATOR)

    sink = commands.add_parser("sink", help="a development SMTP server that files mail")
    sink.add_argument("--listen", type=host_port, default="127.0.0.1:2526")
    sink.add_argument("--dir", type=Path, required=True)

    validate = commands.add_parser("validate", help="check a resource file offline")
    validate.add_argument("file", type=existing_file)
    return parser


def _run_up(args: argparse.Namespace) -> int:
    from kurrier.cli.up import UpSettings, run_up

    if args.namespace and not args.kubeconfig:
        print("kurrier up: error: --namespace needs --kubeconfig", file=sys.stderr)
        return 2
    settings = UpSettings(
        config=args.config,
        kubeconfig=args.kubeconfig,
        namespaces=_namespaces(args.namespace),
        data_dir=args.data_dir,
        nats_cluster=args.nats_cluster,
        nats_sync=args.nats_sync,
        metrics_base_port=args.metrics_base_port,
        passed_on={setting.name: getattr(args, setting.name) for setting in PASSED_ON_BY_UP},
    )
    return asyncio.run(run_up(settings))


def _run_ingress(args: argparse.Namespace) -> int:
    from kurrier.ingress.main import IngressSettings, serve_ingress
    from kurrier.ingress.session_limits import SessionLimits

    settings = IngressSettings(
        nats_url=args.nats_url,
        queue_address=args.queue_address,
        hostname=args.hostname,
        smtp=args.smtp,
        submission=args.submission,
        smtps=args.smtps,
        tls_cert=str(args.tls_cert) if args.tls_cert else None,
        tls_key=str(args.tls_key) if args.tls_key else None,
        replicas=args.nats_replicas,
        metrics_listen=args.metrics_listen,
        limits=SessionLimits.from_flags(vars(args)),
        kube_api=_kube_api(args),
        token_cache_ttl=parse_duration(args.token_cache_ttl),
        queue_tls=queue_tls(args),
    )
    run_service(serve_ingress(settings))
    return 0


def _kube_api(args: argparse.Namespace) -> KubeApiSettings | None:
    from kurrier.ingress.token_review import IN_CLUSTER_DIR, KubeApiSettings

    if not args.kube_api_server:
        return KubeApiSettings.in_cluster()
    return KubeApiSettings(
        server=args.kube_api_server.rstrip("/"),
        token_file=args.kube_token_file or IN_CLUSTER_DIR / "token",
        ca_file=args.kube_ca_file,
    )


def queue_tls(args: argparse.Namespace) -> QueueTls | None:
    """TLS to the queue from the --queue-tls-* flags (ingress, `kurrier queue ACTION`)."""
    from kurrier.core.grpc_tls import QueueTls

    if not args.queue_tls_ca:
        return None
    return QueueTls(
        ca_file=str(args.queue_tls_ca),
        cert_file=str(args.queue_tls_cert) if args.queue_tls_cert else None,
        key_file=str(args.queue_tls_key) if args.queue_tls_key else None,
        server_name=args.queue_tls_server_name,
    )


def _grpc_tls(args: argparse.Namespace) -> GrpcTls | None:
    from kurrier.core.grpc_tls import GrpcTls

    if not (args.grpc_tls_cert and args.grpc_tls_key):
        return None
    return GrpcTls(
        cert_file=str(args.grpc_tls_cert),
        key_file=str(args.grpc_tls_key),
        client_ca_file=str(args.grpc_tls_client_ca) if args.grpc_tls_client_ca else None,
    )


def _run_queue(args: argparse.Namespace) -> int:
    if args.action is not None:
        from kurrier.cli.queue_admin import run_admin

        return run_admin(args, queue_tls(args))

    from kurrier.core.jetstream import HistoryLimits
    from kurrier.queue.main import QueueSettings, serve_queue
    from kurrier.queue.retry_schedule import RetrySchedule

    schedule = RetrySchedule(
        min_backoff=parse_duration(args.min_backoff),
        max_backoff=parse_duration(args.max_backoff),
        max_lifetime=parse_duration(args.max_lifetime),
        delay_warning=parse_duration(args.delay_warning_time),
    )
    settings = QueueSettings(
        nats_url=args.nats_url,
        listen=args.listen,
        replicas=args.nats_replicas,
        schedule=schedule,
        hostname=args.hostname,
        metrics_listen=args.metrics_listen,
        body_store_limit=args.body_store_limit,
        history=HistoryLimits(parse_duration(args.history_retention), args.history_max_bytes),
        grpc_tls=_grpc_tls(args),
        atomic_batch_min=args.atomic_batch_min,
        batched_results=args.batched_results == "on",
        bodies_in_records=args.bodies_in_records == "on",
    )
    run_service(serve_queue(settings))
    return 0


def _run_delivery(args: argparse.Namespace) -> int:
    from kurrier.delivery.main import serve_delivery
    from kurrier.delivery.settings import DeliverySettings

    settings = DeliverySettings(
        helo_name=args.hostname,
        concurrency=args.concurrency,
        tls_ca_file=str(args.tls_ca_file) if args.tls_ca_file else None,
        dns_resolver=args.dns_resolver,
        mx_port=args.mx_port,
        dane=args.dane == "on",
        atomic_batch_min=args.atomic_batch_min,
    )
    run_service(serve_delivery(args.nats_url, args.nats_replicas, settings, args.metrics_listen))
    return 0


def _namespaces(text: str | None) -> tuple[str, ...]:
    return tuple(ns.strip() for ns in (text or "").split(",") if ns.strip())


def _run_operator(args: argparse.Namespace) -> int:
    from kurrier.operator.main import OperatorError, OperatorSettings, serve_operator

    settings = OperatorSettings(
        nats_url=args.nats_url,
        replicas=args.nats_replicas,
        namespaces=_namespaces(args.namespaces),
        kubeconfig=args.kubeconfig,
        metrics_listen=args.metrics_listen,
        dkim_dns_check=parse_duration(args.dkim_dns_check) if args.dkim_dns_check else None,
        dns_resolver=args.dns_resolver,
        platform_namespace=args.platform_namespace.strip(),
    )
    try:
        asyncio.run(serve_operator(settings))
    except OperatorError as error:
        print(f"kurrier operator: {error}", file=sys.stderr)
        return 1
    return 0


def _run_sink(args: argparse.Namespace) -> int:
    from kurrier.cli.sink import run_sink

    asyncio.run(run_sink(args.listen, args.dir))
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from kurrier.core.loader import ResourceError, load_resources
    from kurrier.core.routing import compile_table

    try:
        resources = load_resources(args.file)
    except ResourceError as error:
        print(error, file=sys.stderr)
        return 1
    _, problems = compile_table(resources)
    for problem in problems:
        print(f"{args.file}: {problem.kind} {problem.name!r}: {problem.message}", file=sys.stderr)
    print(f"{args.file}: {len(resources)} resources, {len(problems)} problems")
    return 1 if problems else 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": _run_up,
    "ingress": _run_ingress,
    "queue": _run_queue,
    "delivery": _run_delivery,
    "operator": _run_operator,
    "sink": _run_sink,
    "validate": _run_validate,
}


def _check_retries(parser: Parser, args: argparse.Namespace) -> None:
    """A first retry delay longer than the longest one is a typo, not a schedule."""
    if not hasattr(args, "min_backoff") or getattr(args, "action", None) is not None:
        return
    if parse_duration(args.min_backoff) > parse_duration(args.max_backoff):
        parser.error(
            f"--min-backoff {args.min_backoff} is longer than --max-backoff {args.max_backoff}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_retries(parser, args)
    if args.command not in ("validate", "sink") and getattr(args, "action", None) is None:
        setup_logging(f"kurrier-{args.command}", args.log_level)
    # The long-running services: each traces and measures itself (kurrier.core.telemetry).
    if args.command in SERVICES and getattr(args, "action", None) is None:
        from kurrier.core.telemetry import TelemetryError, setup_telemetry

        try:
            setup_telemetry(f"kurrier-{args.command}")
        except TelemetryError as error:
            print(f"kurrier: error: {error}", file=sys.stderr)
            return 2
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
