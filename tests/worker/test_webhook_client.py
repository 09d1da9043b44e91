"""The webhook sender's HTTP client (skiplock.webhooks.targets.post, libcurl through pycurl)
against real local servers: TLS verified against the trust store, an answer too long to read,
and connections kept between tries."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trustme

from skiplock.webhooks import targets

ALLOW = ("127.0.0.1", "localhost")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keeps the connection open between requests

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.peers.append(self.client_address)  # type: ignore[attr-defined]
        self.server.hosts.append(self.headers["Host"])  # type: ignore[attr-defined]
        code, body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def server(answer=(204, b""), tls: ssl.SSLContext | None = None) -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.answer = answer  # type: ignore[attr-defined]
    httpd.peers = []  # type: ignore[attr-defined]
    httpd.hosts = []  # type: ignore[attr-defined]
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def post(url: str, timeout: float = 5.0) -> targets.Answer:
    return targets.post(url, b'{"n": 1}', {"webhook-id": "msg_test"}, timeout=timeout, allow=ALLOW)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(ca) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    return context


def test_a_certificate_the_trust_store_does_not_vouch_for_is_refused(tls):
    with server(tls=tls) as httpd:
        answer = post(f"https://localhost:{httpd.server_address[1]}/hook")
    assert answer.status_code is None
    assert "not trusted" in answer.error and "certificate" in answer.error
    assert httpd.peers == []  # nothing was posted


def test_a_trusted_certificate_is_posted_to_by_its_name(tls, ca, tmp_path, monkeypatch):
    """The connection goes to the checked address while the URL's host stays the TLS name and
    the Host header (CONNECT_TO). The test's CA stands in for the system's trust store."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setattr(targets, "_trust_store", lambda: (str(ca_file), None))
    with server(tls=tls) as httpd:
        port = httpd.server_address[1]
        answer = post(f"https://localhost:{port}/hook?source=test")
    assert (answer.status_code, answer.error) == (204, None)
    assert httpd.hosts == [f"localhost:{port}"]


def test_an_error_answer_keeps_its_start_and_a_long_one_is_not_read_to_the_end():
    with server(answer=(500, b"x" * 5_000_000)) as httpd:
        answer = post(f"http://127.0.0.1:{httpd.server_address[1]}/hook")
    assert answer.status_code == 500
    assert answer.error == "HTTP 500 (not 2xx): " + "x" * targets.MAX_ERROR_BODY_BYTES


def test_a_redirect_is_not_followed():
    with server(answer=(302, b"")) as httpd:
        answer = post(f"http://127.0.0.1:{httpd.server_address[1]}/hook")
    assert answer.status_code == 302 and answer.error == "HTTP 302 (a redirect, not followed)"
    assert len(httpd.peers) == 1


def test_a_proxy_in_the_environment_is_not_used(monkeypatch):
    """libcurl reads http_proxy: a proxy would take the POST past the checked address."""
    with server() as proxy, server() as receiver:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_address[1]}")
        answer = post(f"http://127.0.0.1:{receiver.server_address[1]}/hook")
    assert answer.status_code == 204
    assert (len(receiver.peers), len(proxy.peers)) == (1, 0)


def test_tries_to_one_receiver_share_a_connection():
    with server() as httpd:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
        answers = [post(url) for _ in range(5)]
    assert [a.status_code for a in answers] == [204] * 5
    assert len(httpd.peers) == 5 and len(set(httpd.peers)) == 1  # one client port: one connection
