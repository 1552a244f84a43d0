"""`kubectl kurrier queue ...`: the admin commands against a cluster install.

The same commands as `kurrier queue`, reaching the queue through the API
server as the caller: it finds a running queue pod of the release, reads
the admin client certificate (the Secret `<fullname>-queue-admin-grpc-tls`)
and forwards a local port to the pod's gRPC port (cli/port_forward.py).
Kubernetes RBAC decides who may: `list` pods, `get` that Secret and
`create` pods/portforward in the namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from kurrier.cli.port_forward import PodPortForward, PortForwardError
from kurrier.cli.queue_admin import AdminError, call_queue, check_admin_args
from kurrier.core.grpc_tls import QueueTls

CHART_NAME = "kurrier"
GRPC_PORT_NAME = "grpc"
DEFAULT_GRPC_PORT = 7070
REQUEST_TIMEOUT = 15.0


class PluginError(Exception):
    """A failure to tell the user in one line (exit code 1)."""


def fullname(release: str) -> str:
    """The chart's `kurrier.fullname` (without a fullnameOverride)."""
    return release if CHART_NAME in release else f"{release}-{CHART_NAME}"


def build_parser() -> argparse.ArgumentParser:
    from kurrier.cli.main import Parser, add_queue_admin

    parser = Parser(prog="kubectl kurrier", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n", "--namespace", help="the release's namespace (default: the context's)"
    )
    parser.add_argument(
        "--kubeconfig", help="kubeconfig file (default: KUBECONFIG, ~/.kube/config)"
    )
    parser.add_argument("--release", default=CHART_NAME, help="the Helm release (default: kurrier)")
    parser.add_argument(
        "-o", "--output", choices=("json", "yaml", "wide"), help="output format (default: text)"
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_queue_admin(
        commands.add_parser("queue", help="administer the release's queue"), reach_flags=False
    )
    return parser


async def _get(session: aiohttp.ClientSession, url: str, what: str) -> Any:
    async with session.get(url) as response:
        payload = await response.json(content_type=None)
        if response.status >= 300:
            message = payload.get("message") if isinstance(payload, dict) else None
            raise PluginError(f"{what}: {response.status} {message or response.reason}")
        return payload


async def _queue_pod(
    session: aiohttp.ClientSession, server: str, namespace: str, release: str
) -> tuple[str, int]:
    """A running queue pod of the release and its gRPC port."""
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=queue"
    pods = await _get(
        session,
        f"{server}/api/v1/namespaces/{namespace}/pods?labelSelector={selector}",
        f"listing the queue pods in {namespace}",
    )
    running = [p for p in pods.get("items", []) if p.get("status", {}).get("phase") == "Running"]
    if not running:
        raise PluginError(f"no running queue pod of release {release!r} in namespace {namespace}")
    pod = running[0]
    ports = [
        port["containerPort"]
        for container in pod["spec"]["containers"]
        for port in container.get("ports", [])
        if port.get("name") == GRPC_PORT_NAME
    ]
    return pod["metadata"]["name"], ports[0] if ports else DEFAULT_GRPC_PORT


async def _admin_certificate(
    session: aiohttp.ClientSession, server: str, namespace: str, release: str, directory: Path
) -> QueueTls:
    name = f"{fullname(release)}-queue-admin-grpc-tls"
    secret = await _get(
        session,
        f"{server}/api/v1/namespaces/{namespace}/secrets/{name}",
        f"reading the admin certificate {namespace}/{name}",
    )
    files = {}
    for key in ("ca.crt", "tls.crt", "tls.key"):
        path = directory / key
        path.write_bytes(base64.b64decode(secret.get("data", {}).get(key, "")))
        files[key] = str(path)
    # The queue's certificate names localhost, for clients inside its pod, as this one is.
    return QueueTls(files["ca.crt"], files["tls.crt"], files["tls.key"], server_name="localhost")


async def run(args: argparse.Namespace) -> str:
    from kurrier.operator.apiserver import CredentialsError, credentials
    from kurrier.operator.main import kopf_settings

    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    try:
        info = credentials(kopf_settings())
    except CredentialsError as error:
        raise PluginError(str(error)) from None
    server = info.server.rstrip("/")
    namespace = args.namespace or info.default_namespace or "default"
    async with aiohttp.ClientSession(
        headers=info.as_http_headers(),
        connector=aiohttp.TCPConnector(ssl=info.as_ssl_context()),
        timeout=aiohttp.ClientTimeout(sock_connect=REQUEST_TIMEOUT),
    ) as session:
        pod, port = await _queue_pod(session, server, namespace, args.release)
        with tempfile.TemporaryDirectory(prefix="kubectl-kurrier-") as directory:
            tls = await _admin_certificate(
                session, server, namespace, args.release, Path(directory)
            )
            forward = PodPortForward(session, server, namespace, pod)
            try:
                args.queue_address = f"127.0.0.1:{await forward.open(port)}"
                return await call_queue(args, tls)
            finally:
                await forward.close()


def _formatted(output: str, fmt: str | None) -> str:
    return yaml.safe_dump(json.loads(output), sort_keys=False).rstrip() if fmt == "yaml" else output


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.json = args.output in ("json", "yaml")
    usage = check_admin_args(args)
    if usage:
        print(f"kubectl kurrier queue {args.action}: {usage}", file=sys.stderr)
        return 2
    try:
        print(_formatted(asyncio.run(run(args)), args.output))
    except (PluginError, PortForwardError, AdminError, aiohttp.ClientError) as error:
        print(f"kubectl kurrier queue {args.action}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
