"""Every setting of the services, each declared once: flag, KURRIER_* variable, type, default, help.

A setting named `mx_port` is the flag `--mx-port` and the variable
`KURRIER_MX_PORT`; the flag wins, then the variable, then the default. From
these declarations `kurrier <service>` gets its flags (`add_settings`),
`kurrier up` writes its children's command lines (`command_line`), and the
chart's tests check the `KURRIER_*` variables each Deployment renders.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kurrier.core.addresses import parse_host_port
from kurrier.core.durations import parse_duration
from kurrier.core.http_endpoint import DEFAULT_METRICS_LISTEN
from kurrier.core.sizes import parse_size

# --- how values are read (argparse types: a bad value is a usage error) -----


def host_port(text: str) -> str:
    try:
        parse_host_port(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def optional_host_port(text: str) -> str | None:
    return None if text in ("", "off") else host_port(text)


def port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return int(text)


def optional_port(text: str) -> int | None:
    return None if text == "off" else port(text)


def duration(text: str) -> str:
    """Checked, and kept as written (5m): the services parse it, `kurrier up` passes it on."""
    try:
        parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def on_off(text: str) -> str:
    """Checked, and kept as written, as durations are: `kurrier up` passes it on."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'on' nor 'off'")
    return text


def batch_size(text: str) -> int:
    if not text.isdigit() or int(text) == 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 0 (off) or a batch size of 2 or more")
    return int(text)


def optional_duration(text: str) -> str | None:
    return None if text == "off" else duration(text)


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


# --- the declaration ---------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """`name` is what argparse sets (args.mx_port); the flag and variable are spelled from it."""

    name: str
    help: str | None = None
    # From the text of the flag or variable to the value.
    parse: Callable[[str], Any] = str
    # As written on a command line; a function when it is costly to work out.
    # None: not set unless given.
    default: str | Callable[[], str] | None = None
    # Read from its variable where it is used; no flag.
    environment_only: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def variable(self) -> str:
        return "KURRIER_" + self.name.upper()

    def default_text(self) -> str | None:
        """What a flag not given stands for: its KURRIER_* variable, else the default."""
        if self.variable in os.environ:
            return os.environ[self.variable]
        return self.default() if callable(self.default) else self.default


def add_settings(parser: argparse.ArgumentParser, settings: Iterable[Setting]) -> None:
    """A flag for each setting. argparse parses a text default as if it were given, so
    a bad KURRIER_* value is a usage error of the command that takes the setting."""
    for setting in settings:
        if not setting.environment_only:
            parser.add_argument(
                setting.flag, type=setting.parse, default=setting.default_text(), help=setting.help
            )


def command_line(settings: Iterable[Setting], values: Mapping[str, object]) -> list[str]:
    """The flags that give a service these values, by setting name; a None value is
    left out, so the service takes its own default."""
    flags = {setting.name: setting.flag for setting in settings}
    unknown = sorted(set(values) - flags.keys())
    if unknown:
        raise ValueError(f"not settings of this service: {', '.join(unknown)}")
    argv: list[str] = []
    for name, value in values.items():
        if value is not None:
            argv += [flags[name], str(value)]
    return argv


# --- every service -----------------------------------------------------------

NATS_URL = Setting(
    "nats_url", "NATS server URL(s), comma separated", default="nats://127.0.0.1:4222"
)
NATS_REPLICAS = Setting("nats_replicas", "replicas of streams and buckets", int, "1")
NATS_CREDS = Setting(
    "nats_creds", "NATS credentials file (JWT and nkey seed)", environment_only=True
)
NATS_NKEY = Setting("nats_nkey", "NATS nkey seed file", environment_only=True)
NATS_USER = Setting("nats_user", "NATS user name", environment_only=True)
NATS_PASSWORD_FILE = Setting(
    "nats_password_file", "file holding the NATS user's password", environment_only=True
)
NATS_TLS_CA = Setting(
    "nats_tls_ca", "CA bundle to verify the NATS servers' certificates", environment_only=True
)
TABLE_KEYS = Setting(
    "table_keys",
    "directory of the keys (<reader>.key) that open the routing table's secrets",
    environment_only=True,
)
HOSTNAME = Setting("hostname", "name in banners and Received", default=socket.getfqdn)
LOG_LEVEL = Setting("log_level", default="INFO")
METRICS_LISTEN = Setting(
    "metrics_listen",
    "HTTP /healthz and /metrics listener ('off' to disable)",
    optional_host_port,
    DEFAULT_METRICS_LISTEN,
)
TRACE_ADDRESSES = Setting(
    "trace_addresses",
    "mail addresses and SMTP replies in spans (true/false)",
    environment_only=True,
)
TRUST_TRACEPARENT_HEADER = Setting(
    "trust_traceparent_header",
    "continue the trace a submitted message's Traceparent header names (true/false)",
    environment_only=True,
)
# The writes of one stream that pile up together go out as one atomic batch
# (core/atomic_batches.py): the queue's records and jobs, delivery's removals.
ATOMIC_BATCH_MIN = Setting(
    "atomic_batch_min",
    "store this many or more writes into one stream waiting together as one atomic batch"
    " (JetStream 2.12+; 0: off)",
    batch_size,
    "16",
)

COMMON = (
    NATS_URL,
    NATS_REPLICAS,
    NATS_CREDS,
    NATS_NKEY,
    NATS_USER,
    NATS_PASSWORD_FILE,
    NATS_TLS_CA,
    TABLE_KEYS,
    HOSTNAME,
    LOG_LEVEL,
    METRICS_LISTEN,
    TRACE_ADDRESSES,
    TRUST_TRACEPARENT_HEADER,
)

# --- ingress -----------------------------------------------------------------

SMTP = Setting("smtp", "SMTP (port 25) listener", host_port, "0.0.0.0:2525")
SUBMISSION = Setting("submission", "submission (port 587) listener", host_port)
SMTPS = Setting("smtps", "implicit TLS (port 465) listener", host_port)
TLS_CERT = Setting("tls_cert", "PEM certificate chain for TLS", existing_file)
TLS_KEY = Setting("tls_key", "PEM private key for TLS", existing_file)
QUEUE_ADDRESS = Setting("queue_address", "the queue's gRPC address", default="127.0.0.1:7070")
# Limits of one ingress process; per-client ones come from RelayPolicy (docs/security.md).
SESSION_LIMITS = (
    Setting("max_connections", "open SMTP sessions", int, "1000"),
    Setting("idle_timeout", "wait for a command", duration, "5m"),
    Setting("session_timeout", "longest session", duration, "30m"),
    Setting("max_commands", "per command per session", int, "1000"),
    Setting("max_line_length", "DATA line, CRLF included", int, "1000"),
    Setting("max_header_size", "header section octets", int, "262144"),
    Setting("max_headers", "header fields per message", int, "1000"),
    Setting("max_hops", "Received headers (loop guard)", int, "50"),
    Setting("auth_failures_per_minute", "per client IP", int, "5"),
)
TOKEN_REVIEW = (
    Setting("kube_api_server", "API server for TokenReview (default: in-cluster)"),
    Setting("kube_token_file", "bearer token file for --kube-api-server", Path),
    Setting("kube_ca_file", "CA of --kube-api-server", existing_file),
    Setting("token_cache_ttl", "keep passed tokens", duration, "30s"),
)
# Ingress and the admin commands (`kurrier queue list ...`) are the queue's clients.
QUEUE_TLS = (
    Setting("queue_tls_ca", "CA of the queue's certificate (TLS to the queue)", existing_file),
    Setting("queue_tls_cert", "client certificate (mTLS)", existing_file),
    Setting("queue_tls_key", "client private key (mTLS)", existing_file),
    Setting("queue_tls_server_name", "name to verify in the queue's certificate"),
)
INGRESS = (
    *COMMON,
    SMTP,
    SUBMISSION,
    SMTPS,
    TLS_CERT,
    TLS_KEY,
    QUEUE_ADDRESS,
    *SESSION_LIMITS,
    *TOKEN_REVIEW,
    *QUEUE_TLS,
)

# --- queue -------------------------------------------------------------------

RETRIES = (
    Setting("min_backoff", "first retry delay", duration, "5m"),
    Setting("max_backoff", "longest retry delay", duration, "1h"),
    Setting("max_lifetime", "bounce after this long", duration, "5d"),
    Setting(
        "delay_warning_time",
        "warn the sender once of mail still queued after this long (0s: never); "
        "a RelayPolicy's delayWarningTime overrides it",
        duration,
        "4h",
    ),
)
HISTORY_RETENTION = Setting(
    "history_retention",
    "keep each message's history (addresses included) this long",
    duration,
    "7d",
)
HISTORY_MAX_BYTES = Setting(
    "history_max_bytes", "cap on stored history; the oldest goes first", size, "1GiB"
)
# Whether a queue has the results of the jobs it dispatches stored in the
# outcomes stream when nothing says otherwise (BATCHED_RESULTS, chart
# queue.batchedResults): also the default of the queue's code that takes it.
BATCHED_RESULTS_BY_DEFAULT = True

# Where the results of the jobs a queue dispatches go (DeliveryJob.batched_results):
# 'on', the outcomes stream, whose acknowledgements write nothing; 'off', the
# work queue that queues of earlier releases read, for a roll back below the
# release that brought the outcomes stream.
BATCHED_RESULTS = Setting(
    "batched_results",
    "have delivery store the results of the jobs this queue dispatches where they are"
    " acknowledged in batches (KURRIER_OUTCOMES); 'off': in KURRIER_RESULTS, which queues"
    " of releases before it read too",
    on_off,
    "on" if BATCHED_RESULTS_BY_DEFAULT else "off",
)
# Whether a queue keeps a body of up to 256 KiB inside its message's record
# when nothing says otherwise (BODIES_IN_RECORDS, chart queue.bodiesInRecords):
# also the default of the queue's code that takes it.
BODIES_IN_RECORDS_BY_DEFAULT = True
# Whether a queue keeps a body of up to 256 KiB inside its message's record
# until the record first changes (core/body_store.py, wire version 6); 'off'
# stores every body over 4 KiB on its own, as pods of releases before it read
# them, for a roll back below the release that brought it (docs/deploy.md).
BODIES_IN_RECORDS = Setting(
    "bodies_in_records",
    "keep a body of up to 256 KiB inside its message's record until the record first"
    " changes; 'off': store it on its own, which pods of releases before it read",
    on_off,
    "on" if BODIES_IN_RECORDS_BY_DEFAULT else "off",
)
QUEUE = (
    *COMMON,
    Setting("listen", "gRPC listen address (or unix:PATH)", default="0.0.0.0:7070"),
    Setting("grpc_tls_cert", "serve gRPC over TLS: certificate", existing_file),
    Setting("grpc_tls_key", "serve gRPC over TLS: private key", existing_file),
    Setting("grpc_tls_client_ca", "require client certs (mTLS)", existing_file),
    Setting(
        "body_store_limit",
        "cap on stored message bodies (e.g. 8GiB); above it ingress answers 452."
        " Keep it below JetStream's storage so the queue can always drain",
        size,
    ),
    HISTORY_RETENTION,
    HISTORY_MAX_BYTES,
    ATOMIC_BATCH_MIN,
    BATCHED_RESULTS,
    BODIES_IN_RECORDS,
    *RETRIES,
)

# --- delivery ----------------------------------------------------------------

TLS_CA_FILE = Setting("tls_ca_file", "CA bundle for 'verify' routes", existing_file)
DNS_RESOLVER = Setting(
    "dns_resolver", "DNS server HOST:PORT (MX, MTA-STS, DKIM record lookups)", host_port
)
MX_PORT = Setting("mx_port", "port MX hosts are contacted on", port, "25")
DANE = Setting(
    "dane",
    "DANE (RFC 7672) for MX routes: 'on' trusts the AD bit of --dns-resolver, "
    "which must validate DNSSEC and be reached over a path nobody can tamper with",
    on_off,
    "off",
)
DELIVERY = (
    *COMMON,
    Setting("concurrency", "transactions in flight", int, "32"),
    TLS_CA_FILE,
    DNS_RESOLVER,
    MX_PORT,
    DANE,
    ATOMIC_BATCH_MIN,
)

# --- operator ----------------------------------------------------------------

OPERATOR = (
    *COMMON,
    Setting("namespaces", "namespaces to watch, comma separated (all)", default=""),
    Setting(
        "platform_namespace",
        "the namespace whose resources govern everyone's mail; each other namespace's "
        "only its own (empty: no tenancy, every resource governs all mail)",
        default="",
    ),
    Setting(
        "kubeconfig",
        "kubeconfig file (default: KUBECONFIG, in-cluster, ~/.kube/config)",
        existing_file,
    ),
    Setting(
        "dkim_dns_check",
        "how often to check that DNS publishes each RelayDomain's DKIM records ('off': never)",
        optional_duration,
        "off",
    ),
    DNS_RESOLVER,
)

# --- queue administration (`kurrier queue list|show|...`) ---------------------

QUEUE_ADMIN = (
    replace(
        QUEUE_ADDRESS, default=None, help="the queue's gRPC address (default: from --data-dir)"
    ),
    *QUEUE_TLS,
)

# The long-running services (the image's commands) and their settings.
SERVICES: dict[str, tuple[Setting, ...]] = {
    "ingress": INGRESS,
    "queue": QUEUE,
    "delivery": DELIVERY,
    "operator": OPERATOR,
}

# `kurrier up`'s own: where its children serve /metrics (the first port and up).
METRICS_BASE_PORT = Setting(
    "metrics_base_port",
    "children serve /metrics and /healthz on 127.0.0.1 from this port up, one each ('off': none)",
    optional_port,
    "9464",
)

# The services' settings `kurrier up` takes too; each child gets those it has.
PASSED_ON_BY_UP = (
    replace(SMTP, default="127.0.0.1:2525"),
    SUBMISSION,
    SMTPS,
    TLS_CERT,
    TLS_KEY,
    HOSTNAME,
    TLS_CA_FILE,
    DNS_RESOLVER,
    MX_PORT,
    DANE,
    ATOMIC_BATCH_MIN,
    *RETRIES,
    LOG_LEVEL,
)
