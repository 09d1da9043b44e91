"""Hosts of a test's own on this machine: network namespaces plugged into one bridge, each with an
address of its own, as separate machines on one switch (Debian's iproute2); haproxy in front of
the API hosts; and clients that submit through it under an Idempotency-Key, retrying until they
have an answer. Nothing here touches an interface, namespace or process it did not make."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_until

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def require_hosts() -> None:
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 to make network namespaces")
    if not os.access(HAPROXY, os.X_OK):
        pytest.skip("haproxy is not installed (Debian package haproxy: `make test` installs it as root)")


@dataclass
class Host:
    name: str
    ns: str  # its network namespace
    address: str
    link: str  # its cable: the bridge's end of its veth pair

    def run(self, command: list[str]) -> list[str]:
        """A command line that runs `command` on this host."""
        return ["ip", "netns", "exec", self.ns, *command]


class Network:
    """A bridge on this machine (the switch; its address is the database services') and hosts in
    network namespaces plugged into it. cut() pulls a host's cable: its packets vanish, no reset
    reaches anyone, its processes go on running."""

    def __init__(self):
        self.tag = f"{os.getpid() % 10000}{random.randint(0, 99):02d}"  # names of at most 15 chars
        taken = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        octet = random.choice([n for n in range(1, 251) if f"10.214.{n}." not in taken])
        self.prefix = f"10.214.{octet}"
        self.gateway = f"{self.prefix}.1"
        self.cidr = f"{self.prefix}.0/24"
        self.bridge = f"sklb{self.tag}"
        self.hosts: list[Host] = []
        ip("link", "add", self.bridge, "type", "bridge")
        try:
            ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str) -> Host:
        n = len(self.hosts) + 1
        host = Host(name, f"skl{self.tag}-{name}", f"{self.prefix}.{10 + n}", f"sklv{self.tag}{n}")
        inside = f"skli{self.tag}{n}"
        ip("netns", "add", host.ns)
        self.hosts.append(host)
        ip("link", "add", host.link, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", host.ns)
        ip("link", "set", host.link, "master", self.bridge)
        ip("link", "set", host.link, "up")
        for command in (
            ["ip", "addr", "add", f"{host.address}/24", "dev", inside],
            ["ip", "link", "set", inside, "up"],
            ["ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(host.run(command), check=True, capture_output=True)
        return host

    def cut(self, host: Host) -> None:
        ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        ip("link", "set", host.link, "up")

    def close(self) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", host.link], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class Haproxy:
    """haproxy on 127.0.0.1:port, balancing HTTP over `servers` (name -> address:port) round
    robin, each health-checked on /healthz every 300 ms (down after two misses, up after two
    answers). A request whose connection fails is sent to another server; one already sent is
    not (a POST may have been acted on): the client retries it."""

    CHECK_INTERVAL_MS = 300

    def __init__(self, servers: dict[str, str]):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="skiplock-haproxy-"))
        self.socket = self.dir / "admin.sock"
        lines = "".join(f"    server {name} {address} check\n" for name, address in servers.items())
        (self.dir / "haproxy.cfg").write_text(
            f"""global
    maxconn 2000
    stats socket {self.socket} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    retries 2
    option redispatch
frontend api
    bind 127.0.0.1:{self.port}
    default_backend apis
backend apis
    balance roundrobin
    option httpchk GET /healthz
    default-server inter {self.CHECK_INTERVAL_MS}ms fall 2 rise 2
{lines}"""
        )
        self.log_path = self.dir / "haproxy.log"
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.dir / "haproxy.cfg")], stdout=log, stderr=subprocess.STDOUT
            )
        wait_until(lambda: self.socket.exists() or self.proc.poll() is not None, timeout=10)
        if self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited: {self.log_path.read_text()}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, dict[str, str]]:
        """Each server's statistics row (`show stat` on the admin socket), by server name."""
        with socket.socket(socket.AF_UNIX) as admin:
            admin.connect(str(self.socket))
            admin.sendall(b"show stat\n")
            raw = b""
            while chunk := admin.recv(65536):
                raw += chunk
        header, *rows = raw.decode().strip().splitlines()
        names = header.lstrip("# ").split(",")
        out = {}
        for row in rows:
            values = dict(zip(names, row.split(","), strict=False))
            if values["svname"] not in ("FRONTEND", "BACKEND"):
                out[values["svname"]] = values
        return out

    def states(self) -> dict[str, str]:
        """Each server's state as haproxy sees it (UP, DOWN, ...)."""
        return {name: row["status"].split()[0] for name, row in self.stats().items()}

    def in_flight(self, name: str) -> int:
        """Requests the server has now (sent, not yet answered)."""
        return int(self.stats()[name]["scur"] or 0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- clients that retry --------------------------------------------------------------------------


@dataclass
class KeyedSubmit:
    """One submit under its Idempotency-Key: every try, and every task id an answer named."""

    key: str
    first_sent: float  # time.monotonic()
    tries: int = 0
    answered: list[int] = field(default_factory=list)  # task ids (the first answer, then replays)
    replayed: int = 0  # answers marked Idempotent-Replayed
    refused: list[int] = field(default_factory=list)  # 4xx codes other than 429 (none expected)
    answered_at: float | None = None


class RetryingClients:
    """`threads` clients, each submitting `body` through `base` one request after another (with
    `pause` between), every submit under a new Idempotency-Key. A try that times out (`timeout`),
    loses its connection or gets a 5xx or 429 is repeated, with the same key and body, until
    answered or `give_up` seconds have passed."""

    def __init__(self, base: str, body: dict, *, threads: int = 2, pause: float = 0.05, timeout: float = 2.0):
        self.base, self.body, self.pause, self.timeout = base, body, pause, timeout
        self.give_up = 60.0
        self.submits: list[KeyedSubmit] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> RetryingClients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.give_up + 10)

    def _run(self) -> None:
        while not self._stop.is_set():
            submit = KeyedSubmit(uuid.uuid4().hex, time.monotonic())
            with self._lock:
                self.submits.append(submit)
            self._until_answered(submit)
            time.sleep(self.pause)

    def _until_answered(self, submit: KeyedSubmit) -> None:
        data = json.dumps(self.body).encode()
        while time.monotonic() - submit.first_sent < self.give_up:
            submit.tries += 1
            request = urllib.request.Request(f"{self.base}/api/submit-task", data=data, method="POST")
            request.add_header("Content-Type", "application/json")
            request.add_header("Idempotency-Key", submit.key)
            retry_after = 0.1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read())
                    submit.answered.append(answer["task_id"])
                    submit.replayed += response.headers.get("Idempotent-Replayed") == "true"
                    submit.answered_at = time.monotonic()
                    return
            except urllib.error.HTTPError as err:
                if err.code < 500 and err.code != 429:
                    submit.refused.append(err.code)
                    return
                retry_after = min(1.0, float(err.headers.get("Retry-After") or 0.1))
            except (OSError, TimeoutError):  # no answer: the request may or may not have landed
                pass
            time.sleep(retry_after)

    # what they saw
    def snapshot(self) -> list[KeyedSubmit]:
        with self._lock:
            return list(self.submits)

    def acknowledged(self) -> list[int]:
        return [s.answered[0] for s in self.snapshot() if s.answered]

    def answered_count(self) -> int:
        return sum(1 for s in self.snapshot() if s.answered)

    def unanswered(self) -> list[KeyedSubmit]:
        return [s for s in self.snapshot() if not s.answered and not s.refused]

    def replay(self, count: int) -> tuple[int, int]:
        """Send `count` answered submits again, key and body unchanged, as a client would that
        never saw its answer: (how many were answered with the same task, marked replayed; how
        many with another task or unmarked)."""
        answered = [s for s in self.snapshot() if s.answered]
        same = other = 0
        data = json.dumps(self.body).encode()
        for submit in random.sample(answered, min(count, len(answered))):
            request = urllib.request.Request(f"{self.base}/api/submit-task", data=data, method="POST")
            request.add_header("Content-Type", "application/json")
            request.add_header("Idempotency-Key", submit.key)
            with urllib.request.urlopen(request, timeout=10) as response:
                task_id = json.loads(response.read())["task_id"]
                replayed = response.headers.get("Idempotent-Replayed") == "true"
            if task_id == submit.answered[0] and replayed:
                same += 1
            else:
                other += 1
        return same, other

    def longest_wait(self, since: float) -> float:
        """The longest a submit sent after `since` (or still open then) took to be answered."""
        waits = [
            s.answered_at - s.first_sent
            for s in self.snapshot()
            if s.answered_at is not None and s.answered_at >= since
        ]
        return max(waits, default=0.0)

    def retried(self) -> int:
        return sum(s.tries - 1 for s in self.snapshot())

    def open_at(self, moment: float) -> list[KeyedSubmit]:
        """Submits sent before `moment` and not yet answered then."""
        return [
            s
            for s in self.snapshot()
            if s.first_sent <= moment and (s.answered_at is None or s.answered_at > moment)
        ]
