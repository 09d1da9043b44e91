"""Callback URLs: which ones a task may name, and POSTing to them.

A callback must not turn skiplock into a way to reach what its clients cannot (SSRF): a URL
whose host resolves to a loopback, private, link-local, multicast or otherwise non-global
address is refused, unless the operator allows that host, address or network
(SKIPLOCK_WEBHOOK_ALLOW). The check runs at submit, for a clear 422, and again before every try:
DNS can change in between. The POST then connects to the very address that was checked (with
the URL's host name for the Host header and TLS), so a second lookup cannot swap it.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import pycurl

MAX_URL_LENGTH = 2048
# A URL without a port reaches its scheme's well-known one.
DEFAULT_PORTS = {"http": 80, "https": 443}
# Submit-time DNS answers kept (host, port, period): a batch names few hosts.
LOOKUP_CACHE_SIZE = 4096
# How long a submit-time DNS answer (or failure) is reused.
RECENT_LOOKUP_SECONDS = 30
# Enough of an error answer to say what went wrong; the rest is not read.
MAX_ERROR_BODY_BYTES = 512
USER_AGENT = "skiplock-webhooks/1"
# An answer's unread rest up to this size is read, to reuse the connection; a longer one closes it.
MAX_DRAINED_BYTES = 64 * 1024


class CallbackRefused(ValueError):
    """The URL may not be used as a callback (the message says why, for the client)."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str  # with the query
    address: str  # the checked IP address to connect to


# What a host name resolves to (an IPv4-mapped IPv6 address counts as its IPv4 address).
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _allowed(host: str, address: Address, allow: tuple[str, ...]) -> bool:
    for entry in allow:
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == host:
            return True
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a host name, and not this one
    return False


def _resolve(host: str, port: int) -> tuple[tuple[Address, ...], str | None]:
    """The host's addresses, or why it has none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return (), f"Its host {host!r} does not resolve ({exc})."
    addresses: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        addresses.append(address)
    return tuple(addresses), None


@functools.lru_cache(maxsize=LOOKUP_CACHE_SIZE)
def _resolve_recently(host: str, port: int, period: int) -> tuple[tuple[Address, ...], str | None]:
    """_resolve, remembered for the rest of a RECENT_LOOKUP_SECONDS period (failures too)."""
    return _resolve(host, port)


def check(url: str, allow: tuple[str, ...] = (), *, fresh: bool = True) -> Target:
    """The target of a callback URL, resolved and checked; raises CallbackRefused.

    fresh=False may reuse a lookup of the last RECENT_LOOKUP_SECONDS: at submit, where a batch
    may name one host a thousand times and the check is only for the client's sake. Before
    each POST the lookup is fresh: that one decides where the request goes."""
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"Longer than {MAX_URL_LENGTH} characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackRefused(f"Not a valid URL: {exc}.") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise CallbackRefused("Must be an http:// or https:// URL.")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("Must not carry credentials (user:password@); sign with the secret instead.")
    host = (parts.hostname or "").lower()
    if not host:
        raise CallbackRefused("Must name a host.")
    if parts.fragment:
        raise CallbackRefused("Must not have a #fragment (it is never sent).")
    port = port or DEFAULT_PORTS[scheme]
    if fresh:
        addresses, problem = _resolve(host, port)
    else:
        addresses, problem = _resolve_recently(host, port, int(time.monotonic() // RECENT_LOOKUP_SECONDS))
    if problem:
        raise CallbackRefused(problem)
    # Every address the name has must pass: the connection may use any of them.
    for address in addresses:
        if not address.is_global and not _allowed(host, address, allow):
            raise CallbackRefused(
                f"Its host {host!r} resolves to {address}, a loopback, private, link-local or "
                "otherwise non-public address; the operator may allow it (SKIPLOCK_WEBHOOK_ALLOW)."
            )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(scheme, host, port, path, str(addresses[0]))


@dataclass(frozen=True)
class Answer:
    status_code: int | None
    latency_ms: float
    error: str | None  # None: a 2xx


def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float, allow: tuple[str, ...]) -> Answer:
    """POST body to the URL's checked address; never follows redirects (a redirect could lead
    anywhere, past the check). Any 2xx is a success."""
    began = time.monotonic()

    def answer(code: int | None, error: str | None) -> Answer:
        return Answer(code, (time.monotonic() - began) * 1000, error)

    try:
        target = check(url, allow)
    except CallbackRefused as exc:
        return answer(None, f"refused: {exc}")
    kept = _Kept()
    curl = _handle()
    curl.reset()  # options only: the handle keeps its open connections
    curl.setopt(pycurl.URL, url)
    # To the very address the check approved, whatever a second lookup would say; the URL's host
    # stays the Host header and the TLS name.
    curl.setopt(
        pycurl.CONNECT_TO,
        [f"{_bracketed(target.host)}:{target.port}:{_bracketed(target.address)}:{target.port}"],
    )
    # No proxy, whatever http_proxy and friends say (libcurl reads them): the POST must reach
    # the checked address itself.
    curl.setopt(pycurl.PROXY, "")
    curl.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
    curl.setopt(pycurl.FOLLOWLOCATION, 0)
    curl.setopt(pycurl.NOSIGNAL, 1)  # timeouts without SIGALRM: the sender runs threads
    curl.setopt(pycurl.TIMEOUT_MS, max(1, int(timeout * 1000)))
    curl.setopt(pycurl.POSTFIELDS, body)
    curl.setopt(pycurl.HTTPHEADER, _header_lines(headers))
    curl.setopt(pycurl.WRITEFUNCTION, kept.write)
    if target.scheme == "https":
        _trust(curl)
    try:
        curl.perform()
    except pycurl.error as exc:
        code, message = exc.args[0], exc.args[1] if len(exc.args) > 1 else ""
        status = curl.getinfo(pycurl.RESPONSE_CODE) or None
        if code == pycurl.E_WRITE_ERROR and status is not None:
            pass  # kept.write stopped an answer too long to read: its status is all we need
        elif code == pycurl.E_OPERATION_TIMEDOUT:
            return answer(None, f"no answer within {timeout:g} s")
        elif code in (pycurl.E_COULDNT_CONNECT, pycurl.E_COULDNT_RESOLVE_HOST):
            os_errno = curl.getinfo(pycurl.OS_ERRNO)  # "Connection refused" says more than libcurl's text
            return answer(None, f"could not connect: {os.strerror(os_errno) if os_errno else message}")
        else:
            return answer(None, f"{_CURL_ERRORS.get(code, f'curl error {code}')}: {message}")
    status = curl.getinfo(pycurl.RESPONSE_CODE)
    if 200 <= status < 300:
        return answer(status, None)
    excerpt = bytes(kept.head).decode("utf-8", "replace").strip()
    reason = "a redirect, not followed" if 300 <= status < 400 else "not 2xx"
    return answer(status, f"HTTP {status} ({reason})" + (f": {excerpt}" if excerpt else ""))


# libcurl (pycurl) sends the webhooks: its C code costs ~40 us of CPU per POST where urllib3's
# Python cost ~150-260 us (measured with 1-4 threads against nginx), which capped one sender
# process near 2,000 deliveries/s. Each send thread keeps a handle of its own, and with it the
# connections it opened (to the checked addresses, see CONNECT_TO): one receiver takes many
# webhooks, and a TCP and TLS handshake per delivery would cost more than the delivery.
_local = threading.local()

_CURL_ERRORS = {
    pycurl.E_SEND_ERROR: "the request could not be sent",
    pycurl.E_RECV_ERROR: "the answer could not be read",
    pycurl.E_GOT_NOTHING: "the connection closed without an answer",
    pycurl.E_SSL_CONNECT_ERROR: "TLS handshake failed",
    pycurl.E_PEER_FAILED_VERIFICATION: "the TLS certificate was not trusted",
}


def _handle() -> pycurl.Curl:
    curl = getattr(_local, "curl", None)
    if curl is None:
        curl = _local.curl = pycurl.Curl()
    return curl


class _Kept:
    """The start of an answer's body (for the error it explains); the rest up to
    MAX_DRAINED_BYTES is read and dropped, to reuse the connection; a longer one stops the
    transfer (the connection closes)."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.read = 0

    def write(self, chunk: bytes) -> int | None:
        self.read += len(chunk)
        if len(self.head) < MAX_ERROR_BODY_BYTES:
            self.head += chunk[: MAX_ERROR_BODY_BYTES - len(self.head)]
        return 0 if self.read > MAX_DRAINED_BYTES else None  # 0: stop (a short write)


def _header_lines(headers: dict[str, str]) -> list[str]:
    lines = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers}
    # "Expect:" off: no 100-continue round trip before the body (libcurl's default for a big one).
    return [f"{name}: {value}" for name, value in lines.items()] + ["Expect:"]


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@functools.cache
def _trust_store() -> tuple[str | None, str | None]:
    """The system's CA certificates, as Python's ssl (and so urllib3 before) used them: the
    libcurl inside the pycurl wheel was built for other paths."""
    paths = ssl.get_default_verify_paths()
    cafile = paths.cafile or paths.openssl_cafile
    capath = paths.capath or paths.openssl_capath
    return (
        cafile if cafile and os.path.isfile(cafile) else None,
        capath if capath and os.path.isdir(capath) else None,
    )


def _trust(curl: pycurl.Curl) -> None:
    cafile, capath = _trust_store()
    if cafile:
        curl.setopt(pycurl.CAINFO, cafile)
    if capath:
        curl.setopt(pycurl.CAPATH, capath)
