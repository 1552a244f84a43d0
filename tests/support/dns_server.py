"""A small authoritative DNS server for tests: real UDP on loopback, zones set by the test.

It stands in for the public DNS, which the test machine cannot reach. Names
with records of another type answer NOERROR with no data; unknown names
answer NXDOMAIN; names marked failing answer SERVFAIL. Every question is
counted, so a test can tell a cached answer from a fresh one. It signs
nothing: DNSSEC is tests/support/dnssec.py's (real signatures, a validating
unbound).
"""

from __future__ import annotations

import socketserver
import threading
from collections import Counter

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from tests.support.processes import free_port


def txt(value: str) -> str:
    """A TXT record's presentation form: quoted, split into 255-octet strings."""
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + chunk.replace("\\", "\\\\").replace('"', '\\"') + '"' for chunk in chunks)


class DnsServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port()
        self._records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self._failing: set[str] = set()
        self.questions: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        server = self

        class _Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                sock.sendto(server.answer(data), self.client_address)

        self._server = socketserver.ThreadingUDPServer((host, self.port), _Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        """HOST:PORT, as `--dns-resolver` takes it."""
        return f"{self.host}:{self.port}"

    def add(self, name: str, rdtype: str, *rdatas: str, ttl: int = 300) -> None:
        with self._lock:
            self._records[(name.lower().rstrip("."), rdtype.upper())] = (ttl, list(rdatas))

    def remove(self, name: str, rdtype: str) -> None:
        with self._lock:
            self._records.pop((name.lower().rstrip("."), rdtype.upper()), None)

    def fail(self, name: str) -> None:
        with self._lock:
            self._failing.add(name.lower().rstrip("."))

    def answer(self, data: bytes) -> bytes:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.questions[(name, rdtype)] += 1
            found = self._records.get((name, rdtype))
            known = any(known_name == name for known_name, _ in self._records)
            failing = name in self._failing
        if failing:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif found is not None:
            ttl, rdatas = found
            response.answer.append(
                dns.rrset.from_text_list(question.name, ttl, "IN", rdtype, rdatas)
            )
        elif not known:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
