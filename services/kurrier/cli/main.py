"""The `kurrier` command: every service's entrypoint plus the local tools.

Every service flag can also come from a KURRIER_* environment variable (the
flag's name upper-cased, dashes as underscores), as containers prefer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kurrier.core.addresses import parse_host_port
from kurrier.core.durations import parse_duration
from kurrier.core.http_endpoint import DEFAULT_METRICS_LISTEN
from kurrier.core.lifecycle import run_service
from kurrier.core.logs import setup_logging
from kurrier.core.sizes import parse_size

if TYPE_CHECKING:
    from kurrier.ingress.queue_client import QueueTls
    from kurrier.ingress.token_review import KubeApiSettings
    from kurrier.queue.main import GrpcTls

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_DATA_DIR = Path.home() / ".local" / "state" / "kurrier"


class Parser(argparse.ArgumentParser):
    """Usage errors are one line and exit code 2, never a traceback."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _env(flag: str, default: str | None = None) -> str | None:
    return os.environ.get("KURRIER_" + flag.lstrip("-").upper().replace("-", "_"), default)


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """A flag whose default comes from its KURRIER_* variable when set."""
    default = kwargs.pop("default", None)
    kwargs["default"] = _env(flag, default)
    if kwargs["default"] is not None and "type" in kwargs:
        kwargs["default"] = kwargs["type"](kwargs["default"])
    parser.add_argument(flag, **kwargs)


def _host_port(text: str) -> str:
    try:
        parse_host_port(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def _optional_host_port(text: str) -> str | None:
    return None if text in ("", "off") else _host_port(text)


def _duration(text: str) -> str:
    try:
        parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def _add_common(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--nats-url", default=DEFAULT_NATS_URL, help="NATS server URL(s), comma separated")
    _add(parser, "--nats-replicas", type=int, default="1", help="replicas of streams and buckets")
    _add(parser, "--hostname", default=socket.getfqdn(), help="name in banners and Received")
    _add(parser, "--log-level", default="INFO")
    _add(
        parser,
        "--metrics-listen",
        type=_optional_host_port,
        default=DEFAULT_METRICS_LISTEN,
        help="HTTP /healthz and /metrics listener ('off' to disable)",
    )


def _add_retry_flags(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--min-backoff", type=_duration, default="5m", help="first retry delay")
    _add(parser, "--max-backoff", type=_duration, default="1h", help="longest retry delay")
    _add(parser, "--max-lifetime", type=_duration, default="5d", help="bounce after this long")


def _add_listener_flags(parser: argparse.ArgumentParser, smtp_default: str) -> None:
    _add(parser, "--smtp", type=_host_port, default=smtp_default, help="SMTP (port 25) listener")
    _add(parser, "--submission", type=_host_port, help="submission (port 587) listener")
    _add(parser, "--smtps", type=_host_port, help="implicit TLS (port 465) listener")
    _add(parser, "--tls-cert", type=_existing_file, help="PEM certificate chain for TLS")
    _add(parser, "--tls-key", type=_existing_file, help="PEM private key for TLS")


def _add_ingress_limits(parser: argparse.ArgumentParser) -> None:
    """Limits of one ingress process; per-client ones come from RelayPolicy (docs/security.md)."""
    _add(parser, "--max-connections", type=int, default="1000", help="open SMTP sessions")
    _add(parser, "--idle-timeout", type=_duration, default="5m", help="wait for a command")
    _add(parser, "--session-timeout", type=_duration, default="30m", help="longest session")
    _add(parser, "--max-commands", type=int, default="1000", help="per command per session")
    _add(parser, "--max-line-length", type=int, default="1000", help="DATA line, CRLF included")
    _add(parser, "--max-header-size", type=int, default="262144", help="header section octets")
    _add(parser, "--max-headers", type=int, default="1000", help="header fields per message")
    _add(parser, "--max-hops", type=int, default="50", help="Received headers (loop guard)")
    _add(parser, "--auth-failures-per-minute", type=int, default="5", help="per client IP")
    _add(parser, "--kube-api-server", help="API server for TokenReview (default: in-cluster)")
    _add(parser, "--kube-token-file", type=Path, help="bearer token file for --kube-api-server")
    _add(parser, "--kube-ca-file", type=_existing_file, help="CA of --kube-api-server")
    _add(parser, "--token-cache-ttl", type=_duration, default="30s", help="keep passed tokens")
    _add(parser, "--queue-tls-ca", type=_existing_file, help="CA of the queue's certificate")
    _add(parser, "--queue-tls-cert", type=_existing_file, help="client certificate (mTLS)")
    _add(parser, "--queue-tls-key", type=_existing_file, help="client private key (mTLS)")
    _add(parser, "--queue-tls-server-name", help="name to verify in the queue's certificate")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_body_store_limit(parser: argparse.ArgumentParser) -> None:
    _add(
        parser,
        "--body-store-limit",
        type=_size,
        help="cap on stored message bodies (e.g. 8GiB); above it ingress answers 452."
        " Keep it below JetStream's storage so the queue can always drain",
    )


def _add_queue_admin(queue: argparse.ArgumentParser) -> None:
    admin = queue.add_subparsers(dest="action", parser_class=Parser, metavar="ACTION")
    where = Parser(add_help=False)
    _add(where, "--queue-address", help="the queue's gRPC address (default: from --data-dir)")
    where.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="a `kurrier up`")
    where.add_argument("--json", action="store_true", help="machine-readable output")
    filters = Parser(add_help=False)
    filters.add_argument("--state", choices=("active", "deferred", "held"))
    filters.add_argument("--domain", help="messages with a pending recipient in this domain")
    filters.add_argument("--sender", help="exact sender address ('<>' for bounces)")
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


def build_parser() -> Parser:
    parser = Parser(prog="kurrier", description="A Kubernetes-native SMTP relay.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    up = commands.add_parser("up", help="run the whole relay locally")
    source = up.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=_existing_file, help="resource YAML file")
    source.add_argument(
        "--kubeconfig", type=_existing_file, help="take the resources from this cluster instead"
    )
    up.add_argument("--namespace", help="with --kubeconfig: watch only these (comma separated)")
    up.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    _add_listener_flags(up, "127.0.0.1:2525")
    up.add_argument("--hostname", default=socket.getfqdn())
    up.add_argument("--tls-ca-file", type=_existing_file, help="CA bundle for 'verify' routes")
    up.add_argument("--dns-resolver", type=_host_port, help="DNS server for MX lookups")
    up.add_argument("--mx-port", type=_port, default=25, help="port MX hosts are contacted on")
    up.add_argument("--log-level", default="INFO")
    up.add_argument(
        "--nats-cluster",
        type=int,
        choices=(1, 3, 5),
        default=1,
        help="NATS nodes: 3 or 5 run a JetStream cluster with 3 replicas and two of each worker",
    )
    _add_retry_flags(up)

    ingress = commands.add_parser("ingress", help="run the SMTP ingress service")
    _add_common(ingress)
    _add_listener_flags(ingress, "0.0.0.0:2525")
    _add(ingress, "--queue-address", default="127.0.0.1:7070", help="the queue's gRPC address")
    _add_ingress_limits(ingress)

    queue = commands.add_parser(
        "queue", help="run the queue service, or administer the queue (list, show, hold, ...)"
    )
    _add_common(queue)
    _add(queue, "--listen", default="0.0.0.0:7070", help="gRPC listen address (or unix:PATH)")
    _add(queue, "--grpc-tls-cert", type=_existing_file, help="serve gRPC over TLS: certificate")
    _add(queue, "--grpc-tls-key", type=_existing_file, help="serve gRPC over TLS: private key")
    _add(queue, "--grpc-tls-client-ca", type=_existing_file, help="require client certs (mTLS)")
    _add_body_store_limit(queue)
    _add_retry_flags(queue)
    _add_queue_admin(queue)

    delivery = commands.add_parser("delivery", help="run the delivery service")
    _add_common(delivery)
    _add(delivery, "--concurrency", type=int, default="32", help="transactions in flight")
    _add(delivery, "--tls-ca-file", type=_existing_file, help="CA bundle for 'verify' routes")
    _add(delivery, "--dns-resolver", type=_host_port, help="DNS server HOST:PORT for MX lookups")
    _add(delivery, "--mx-port", type=_port, default="25", help="port MX hosts are contacted on")

    operator = commands.add_parser("operator", help="run the Kubernetes operator")
    _add_common(operator)
    _add(operator, "--namespaces", default="", help="namespaces to watch, comma separated (all)")
    _add(
        operator,
        "--kubeconfig",
        type=_existing_file,
        help="kubeconfig file (default: KUBECONFIG, in-cluster, ~/.kube/config)",
    )

    sink = commands.add_parser("sink", help="a development SMTP server that files mail")
    sink.add_argument("--listen", type=_host_port, default="127.0.0.1:2526")
    sink.add_argument("--dir", type=Path, required=True)

    validate = commands.add_parser("validate", help="check a resource file offline")
    validate.add_argument("file", type=_existing_file)
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
        smtp=args.smtp,
        submission=args.submission,
        smtps=args.smtps,
        tls_cert=str(args.tls_cert) if args.tls_cert else None,
        tls_key=str(args.tls_key) if args.tls_key else None,
        hostname=args.hostname,
        min_backoff=args.min_backoff,
        max_backoff=args.max_backoff,
        max_lifetime=args.max_lifetime,
        tls_ca_file=str(args.tls_ca_file) if args.tls_ca_file else None,
        dns_resolver=args.dns_resolver,
        mx_port=args.mx_port,
        nats_cluster=args.nats_cluster,
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
        limits=SessionLimits(
            max_connections=args.max_connections,
            idle_timeout=parse_duration(args.idle_timeout),
            session_timeout=parse_duration(args.session_timeout),
            max_commands=args.max_commands,
            max_line_length=args.max_line_length,
            max_header_size=args.max_header_size,
            max_headers=args.max_headers,
            max_hops=args.max_hops,
            auth_failures_per_minute=args.auth_failures_per_minute,
        ),
        kube_api=_kube_api(args),
        token_cache_ttl=parse_duration(args.token_cache_ttl),
        queue_tls=_queue_tls(args),
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


def _queue_tls(args: argparse.Namespace) -> QueueTls | None:
    from kurrier.ingress.queue_client import QueueTls

    if not args.queue_tls_ca:
        return None
    return QueueTls(
        ca_file=str(args.queue_tls_ca),
        cert_file=str(args.queue_tls_cert) if args.queue_tls_cert else None,
        key_file=str(args.queue_tls_key) if args.queue_tls_key else None,
        server_name=args.queue_tls_server_name,
    )


def _grpc_tls(args: argparse.Namespace) -> GrpcTls | None:
    from kurrier.queue.main import GrpcTls

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

        return run_admin(args)

    from kurrier.queue.main import QueueSettings, serve_queue
    from kurrier.queue.retry_schedule import RetrySchedule

    schedule = RetrySchedule(
        min_backoff=parse_duration(args.min_backoff),
        max_backoff=parse_duration(args.max_backoff),
        max_lifetime=parse_duration(args.max_lifetime),
    )
    settings = QueueSettings(
        nats_url=args.nats_url,
        listen=args.listen,
        replicas=args.nats_replicas,
        schedule=schedule,
        hostname=args.hostname,
        metrics_listen=args.metrics_listen,
        body_store_limit=args.body_store_limit,
        grpc_tls=_grpc_tls(args),
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


# The long-running services: each traces and measures itself (kurrier.core.telemetry).
SERVICES = ("ingress", "queue", "delivery", "operator")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("validate", "sink") and getattr(args, "action", None) is None:
        setup_logging(f"kurrier-{args.command}", args.log_level)
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
