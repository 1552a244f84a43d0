"""A TCP forwarder a test can cut: the network between a client and a real server.

Everything passes through unchanged (SMTP, TLS, NATS, HTTPS to the API
server); the test decides when the path breaks:

- `sever()` closes every open connection at once, as a next hop or a
  middlebox dropping idle sessions does: both ends see the connection closed;
- `stop()` also stops listening, so new connections are refused (the server
  is down, as far as the client can tell); `start()` listens again on the
  same port;
- `silence()` drops every byte from then on, both ways, and keeps the
  connections open, as a path that loses everything (a node gone, a
  partition) does: to TCP at either end nothing is wrong. `speak()` ends it.

The operator tests use it for an API server outage, the delivery tests for
a next hop that closes a pooled session.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.processes import free_port

_Pair = tuple[socket.socket, socket.socket]


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.port = free_port()
        self._target = (target_host, target_port)
        self._listener: socket.socket | None = None
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        # Connections forwarded so far.
        self.connections = 0
        self._silent = threading.Event()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and close the open ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown, not only close: it wakes the thread blocked in accept().
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self.sever()

    def sever(self) -> None:
        """Close every connection open now; new ones are still forwarded."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close(pair)

    def silence(self) -> None:
        self._silent.set()

    def speak(self) -> None:
        self._silent.clear()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(self._target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.connections += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, pair), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, pair: _Pair) -> None:
        try:
            while data := source.recv(65536):
                if not self._silent.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            self._close(pair)

    def _close(self, pair: _Pair) -> None:
        with self._lock:
            if pair not in self._pairs:
                return
            self._pairs.discard(pair)
        for end in pair:
            # shutdown first: it wakes the other pump, blocked in recv() on this socket.
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
