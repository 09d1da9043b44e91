"""A TCP proxy in front of gunicorn that fails on purpose, as networks do: it drops the answers
of its first connections after the API has received (and acted on) their request, or cuts a
stream after a given point. It records each request's head, to see what the client sent."""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

CHUNK = 65536


class FlakyProxy:
    """drop_answers: that many connections forward their request and lose the answer (the proxy
    closes both ends once the API starts answering). cut_after: the first connection whose
    answer matches this pattern is closed right after it."""

    def __init__(self, upstream: str, *, drop_answers: int = 0, cut_after: bytes | None = None):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.drop_answers = drop_answers
        self.cut_after = re.compile(cut_after, re.DOTALL) if cut_after else None
        self.requests: list[bytes] = []  # each request's head, as received
        self.dropped = 0
        self.cut = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._closed = False

    def start(self) -> FlakyProxy:
        self._spawn(self._accept)
        return self

    def close(self) -> None:
        self._closed = True
        _shut(self._listener)
        with self._lock:
            for sock in self._sockets:
                _shut(sock)
        for thread in self._threads:
            thread.join(10)

    def header(self, request: int, name: str) -> str | None:
        """A header of a recorded request (the first one of that name)."""
        match = re.search(
            rb"\r\n" + re.escape(name.encode()) + rb":\s*([^\r\n]*)", self.requests[request], re.I
        )
        return match.group(1).decode() if match else None

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._sockets += [downstream, upstream]
                drop = self.dropped < self.drop_answers
                self.dropped += drop
            self._spawn(self._requests, downstream, upstream)
            self._spawn(self._answers, upstream, downstream, drop)

    def _requests(self, downstream: socket.socket, upstream: socket.socket) -> None:
        """Client to API, recording each request's head (a keep-alive connection sends several)."""
        pending, body_left = b"", 0
        try:
            while data := downstream.recv(CHUNK):
                upstream.sendall(data)
                pending += data
                while True:
                    skipped = min(body_left, len(pending))
                    pending, body_left = pending[skipped:], body_left - skipped
                    if body_left or (end := pending.find(b"\r\n\r\n")) < 0:
                        break
                    head, pending = pending[:end], pending[end + 4 :]
                    with self._lock:
                        self.requests.append(head)
                    length = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
                    body_left = int(length.group(1)) if length else 0
        except OSError:
            pass
        finally:
            _shut(upstream)

    def _answers(self, upstream: socket.socket, downstream: socket.socket, drop: bool) -> None:
        seen = b""
        try:
            while data := upstream.recv(CHUNK):
                if drop:
                    break  # the API answered: the request was done; the client never hears of it
                downstream.sendall(data)
                if self.cut_after is not None:
                    seen += data
                    if self.cut_after.search(seen):
                        with self._lock:
                            self.cut += 1
                            self.cut_after = None  # the first such answer only
                        break
        except OSError:
            pass
        finally:
            _shut(downstream)
            _shut(upstream)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@contextmanager
def flaky_proxy(upstream: str, **faults) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(upstream, **faults).start()
    try:
        yield proxy
    finally:
        proxy.close()
