"""Mutual TLS on the queue's gRPC port: the server's side, and its clients' (ingress, admin CLI).

A client is known by its certificate's subject Common Name, as the
Kubernetes API server knows its clients: every issuer (the chart's genCA,
its cert-manager Certificates, `kurrier up`'s CA) writes one of the names
below, and the queue decides on it what the client may call
(`queue/callers.py`). The server follows its files: a renewed certificate,
key or client CA serves the next connection, without a restart. A client
reads its files when it makes the channel; ingress, which keeps its channel,
makes a new one when they are renewed (`ingress/queue_client.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from kurrier.core.certificate_files import CertificateFiles, CertificatePair

ChannelOptions = Sequence[tuple[str, str | int]]

# A channel whose queue went away tries again after a pause that grows, by
# gRPC's default, up to two minutes: a queue back after a long outage would
# then wait that long for ingress. Within the cluster a try is cheap.
# A connection whose path silently drops everything (a node gone, a
# partition) looks healthy to TCP for many minutes: pings unanswered for
# KEEPALIVE_TIMEOUT_MS end it, and the channel moves to another address.
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
CHANNEL_OPTIONS: ChannelOptions = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 4000),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
# The queue's side: accept those pings (by default a server answers a client
# that pings more often than every five minutes with GOAWAY).
SERVER_OPTIONS: ChannelOptions = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
)

# The Common Names of the certificates, fixed whatever the release is called.
QUEUE_IDENTITY = "kurrier-queue"
INGRESS_IDENTITY = "kurrier-ingress"
ADMIN_IDENTITY = "kurrier-queue-admin"


@dataclass(frozen=True)
class GrpcTls:
    """TLS on the gRPC port; with client_ca_file, mutual TLS (a client certificate it signed)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    @property
    def knows_clients(self) -> bool:
        """Whether every client presents a certificate, so its identity can be checked."""
        return self.client_ca_file is not None

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that follow the files: each new connection's handshake first takes
        a renewed certificate, key or client CA, once they changed and load as a pair."""
        files = CertificateFiles(self.cert_file, self.key_file, self.client_ca_file)

        def configuration(pair: CertificatePair) -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration(
                [(pair.key, pair.cert)], root_certificates=pair.ca
            )

        def renewed() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC's core before every handshake; None keeps the one it has.
            pair = files.renewed()
            return configuration(pair) if pair is not None else None

        return grpc.dynamic_ssl_server_credentials(
            configuration(files.load()),
            renewed,
            require_client_authentication=self.knows_clients,
        )


@dataclass(frozen=True)
class QueueTls:
    """TLS to the queue: the CA that signed the queue's certificate, and ours for mutual TLS."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None  # when the address is not the name in the certificate

    def files(self) -> CertificateFiles | None:
        """The client certificate's files with the CA, to follow renewals; None without one."""
        if self.cert_file is None or self.key_file is None:
            return None
        return CertificateFiles(self.cert_file, self.key_file, self.ca_file)

    def channel(
        self, address: str, options: ChannelOptions = (), pair: CertificatePair | None = None
    ) -> grpc.aio.Channel:
        """pair: the client certificate, key and CA as renewed; else read from the files."""
        if pair is None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(self.ca_file).read_bytes(),
                private_key=Path(self.key_file).read_bytes() if self.key_file else None,
                certificate_chain=Path(self.cert_file).read_bytes() if self.cert_file else None,
            )
        else:
            credentials = grpc.ssl_channel_credentials(pair.ca, pair.key, pair.cert)
        options = [*CHANNEL_OPTIONS, *options]
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return grpc.aio.secure_channel(address, credentials, options=options)


def queue_channel(
    address: str, tls: QueueTls | None, options: ChannelOptions = ()
) -> grpc.aio.Channel:
    """A channel to the queue: over TLS when tls is given, else plaintext."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=[*CHANNEL_OPTIONS, *options])
    return tls.channel(address, options)
