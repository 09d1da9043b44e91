"""The webhook sender in a process of its own: started by each worker (SKIPLOCK_WEBHOOK_SENDER=
process, the default), or alone, on any host, by `skiplock webhooks` (workers then run with
SKIPLOCK_WEBHOOK_SENDER=off).

As a thread of the supervisor, the sender's JSON, signing and HTTP took the supervisor's CPU and
GIL from the claim loop: a drain where every task had a callback ran at 57% of one without.
Deliveries are leased rows (webhook_deliveries), so the process shares nothing with the worker
but the database: one that dies loses nothing (a try cut short is sent again when its lease
ends), and the worker starts another. A worker starts its sender only once a delivery is
pending: a deployment without webhooks runs no sender process (a fresh interpreter costs about
0.4 s of CPU and 40 MB).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.process
import signal
import threading
from multiprocessing.context import SpawnContext
from typing import Literal

from skiplock import logs
from skiplock.settings import Settings
from skiplock.sql.rows import Connection
from skiplock.sql.webhooks import webhook_deliveries_waiting
from skiplock.webhooks.sender import WebhookSender

log = logging.getLogger("skiplock.webhooks")

# A fresh interpreter: a fork of the supervisor would inherit its threads and connections half-held.
START_METHOD: Literal["spawn"] = "spawn"
# A sender process that died is started again at most this often (a crash loop logs a line each time).
RESTART_INTERVAL_SECONDS = 5.0
# Until its sender runs, a worker looks this often whether a delivery is pending: the first
# webhook after a worker starts waits at most this (and the process's start) more.
WANTED_CHECK_SECONDS = 1.0
# Tries under way get their timeout and this margin to be recorded when the sender stops.
STOP_MARGIN_SECONDS = 2.0
# A stopping sender process gets its tries' timeout, STOP_MARGIN_SECONDS and this to exit.
EXIT_MARGIN_SECONDS = 1.0
# How often the foreground loop looks at its sender's thread.
CHECK_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1


def run_foreground(
    settings: Settings,
    sender_id: str,
    *,
    stop_on: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> int:
    """Send webhooks until one of `stop_on` (`skiplock webhooks`; the worker's process stops on
    SIGTERM only). Exit 0 after a graceful stop; 1 if the sender's thread died."""
    stop = threading.Event()
    for signum in stop_on:
        signal.signal(signum, lambda *_: stop.set())
    sender = WebhookSender(settings, sender_id).start()
    log.info("webhook sender %s started", sender_id)
    while not stop.wait(CHECK_SECONDS):
        if not sender.is_alive():
            log.error("webhook sender %s: its thread died", sender_id)
            return 1
    sender.stop(timeout=settings.webhook_timeout_seconds + STOP_MARGIN_SECONDS)
    log.info("webhook sender %s stopped", sender_id)
    return 0


def _process_main(settings: Settings, sender_id: str, log_level: int) -> None:
    """The worker's sender process: dies with the worker (Linux), logs as the worker does."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the worker stops it itself
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # Ctrl-C reaches the whole process group: the worker decides when its sender stops (SIGTERM,
    # once its tasks are written), so the webhooks of its last tasks still go out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(log_level, settings.log_format)
    logs.bind(worker_id=sender_id)
    raise SystemExit(run_foreground(settings, sender_id, stop_on=(signal.SIGTERM,)))


class SenderProcess:
    """A worker's webhook sender process: started once there is something to send (a worker of
    a deployment without webhooks never pays for one), started again if it dies, stopped
    (SIGTERM, then the tries under way get their time) when the worker stops. None at all with
    SKIPLOCK_WEBHOOK_SENDER=off (`skiplock webhooks` runs elsewhere)."""

    def __init__(self, settings: Settings, sender_id: str):
        self.settings = settings
        self.sender_id = sender_id
        self._mp: SpawnContext = multiprocessing.get_context(START_METHOD)
        self._process: multiprocessing.process.BaseProcess | None = None
        self._next_check = 0.0
        self.restarts = 0

    def check(self, db: Connection, now: float) -> None:
        """Once a turn of the supervisor's loop (a clock comparison; every WANTED_CHECK_SECONDS
        an indexed EXISTS until it runs, every RESTART_INTERVAL_SECONDS a look at the process):
        start it when a delivery is pending, start it again if it died."""
        if now < self._next_check or self.settings.webhook_sender == "off":
            return
        if self._process is None:
            self._next_check = now + WANTED_CHECK_SECONDS
            if webhook_deliveries_waiting(db):
                self._start()
            return
        self._next_check = now + RESTART_INTERVAL_SECONDS
        if not self._process.is_alive():
            log.warning(
                "webhook sender process %s exited with %s; starting another",
                self._process.pid,
                self._process.exitcode,
            )
            self.restarts += 1
            self._start()

    def _start(self) -> None:
        self._process = self._mp.Process(
            target=_process_main,
            args=(self.settings, self.sender_id, logging.getLogger("skiplock").getEffectiveLevel()),
            name="skiplock-webhooks",
            daemon=True,
        )
        self._process.start()

    def stop(self) -> None:
        """SIGTERM, and the time the tries under way may take; then SIGKILL."""
        process, self._process = self._process, None
        if process is None or not process.is_alive():
            return
        process.terminate()
        process.join(self.settings.webhook_timeout_seconds + STOP_MARGIN_SECONDS + EXIT_MARGIN_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None
