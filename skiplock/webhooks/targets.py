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
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3

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
# Receivers whose connections are kept open, and connections kept per receiver.
MAX_POOLS = 100
POOL_CONNECTIONS = 8
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
    host_header = target.host if target.port in DEFAULT_PORTS.values() else f"{target.host}:{target.port}"
    try:
        response = _pool_for(target).urlopen(
            "POST",
            target.path,
            body=body,
            headers={
                "Host": host_header,
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                **headers,
            },
            redirect=False,
            preload_content=False,
            timeout=urllib3.Timeout(total=timeout),
        )
        try:
            status = response.status
            if 200 <= status < 300:
                return answer(status, None)
            excerpt = response.read(MAX_ERROR_BODY_BYTES).decode("utf-8", "replace").strip()
            reason = "a redirect, not followed" if 300 <= status < 400 else "not 2xx"
            return answer(status, f"HTTP {status} ({reason})" + (f": {excerpt}" if excerpt else ""))
        finally:
            _release(response)
    except urllib3.exceptions.NewConnectionError as exc:  # (a subclass of the timeout error)
        return answer(None, "could not connect: " + str(exc).split(": ", 1)[-1])
    except urllib3.exceptions.TimeoutError:
        return answer(None, f"no answer within {timeout:g} s")
    except urllib3.exceptions.HTTPError as exc:
        return answer(None, f"{type(exc).__name__}: {exc}")


# Connections are kept open per checked address (and host name, for TLS and Host) between tries:
# one receiver takes many webhooks, and a TCP and TLS handshake per delivery would cost more
# than the delivery. A pool is only ever reached through a fresh check (post), so keeping it
# lets no one past the SSRF rules.
_pools: OrderedDict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = OrderedDict()
_pools_lock = threading.Lock()


def _pool_for(target: Target) -> urllib3.HTTPConnectionPool:
    key = (target.scheme, target.address, target.port, target.host)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is not None:
            _pools.move_to_end(key)
            return pool
        if target.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                target.address,
                target.port,
                server_hostname=target.host,
                assert_hostname=target.host,
                retries=False,
                maxsize=POOL_CONNECTIONS,
                block=False,
            )
        else:
            pool = urllib3.HTTPConnectionPool(
                target.address, target.port, retries=False, maxsize=POOL_CONNECTIONS, block=False
            )
        _pools[key] = pool
        if len(_pools) > MAX_POOLS:
            _pools.popitem(last=False)[1].close()  # idle connections close; busy ones on return
        return pool


def _release(response) -> None:
    """Back to its pool if what is left of the answer is small enough to read; closed if not."""
    remaining = response.length_remaining
    if remaining is not None and remaining <= MAX_DRAINED_BYTES:
        response.drain_conn()
        response.release_conn()
    else:
        response.close()
