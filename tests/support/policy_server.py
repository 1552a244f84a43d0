"""An HTTPS server for an MTA-STS policy file (`/.well-known/mta-sts.txt`) on a loopback address.

MTA-STS policies live on port 443 by definition (RFC 8461 3.3), so this binds
443 (the tests run as root) on an address of the test's choosing, and DNS
from the test's DnsServer points `mta-sts.<domain>` at it.
"""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

POLICY_PATH = "/.well-known/mta-sts.txt"


class PolicyServer:
    def __init__(self, host: str, context: ssl.SSLContext, policy: str) -> None:
        self.policy = policy
        self.requests = 0
        server = self

        class _Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                if self.path != POLICY_PATH:
                    self.send_error(404)
                    return
                body = server.policy.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output to what failed

        self._http = ThreadingHTTPServer((host, 443), _Handler)
        self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def __enter__(self) -> PolicyServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.shutdown()
        self._http.server_close()
