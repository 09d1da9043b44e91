"""Clients waiting on tasks (long-polls, event streams), with no database connection and no
process held per waiting client.

Each API process has one WatchHub: one connection that LISTENs on skiplock_task_changed, and a
thread (a greenlet under gevent) that wakes the waiters of the tasks named in each notification.
A task gets a row in task_watchers while some client of this process waits on it, so the
statements that change tasks NOTIFY only about those (and not at all when nobody waits).

A notification can be missed (the listening connection was lost and is being replaced, or a
change committed between a client's first look and its registration): once a second the hub
also reads the state of every task it watches, in one query, and wakes the waiters of those that
changed. A waiter never waits longer than its deadline either way.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import defaultdict

from skiplock.db import connect, pooled_connection
from skiplock.sql.fragments import CHANGED_CHANNEL, FINAL_STATUSES
from skiplock.sql.tasks import TaskRow
from skiplock.sql.watchers import TaskState, task_states, task_unwatch, task_watch

log = logging.getLogger("skiplock.api")

# The safety net: how often the hub reads the state of what it watches.
RECHECK_SECONDS = 1.0
# Watches are refreshed this often (rows older than the workers' STALE_WATCH_SECONDS are pruned).
REFRESH_SECONDS = 60.0
RECONNECT_SECONDS = 1.0
# The listener looks up from its connection this often (to recheck, refresh or stop).
TICK_SECONDS = 0.25
# close() waits this long for the listener to notice it should stop (a few ticks).
CLOSE_JOIN_SECONDS = TICK_SECONDS * 8


class Waiter:
    """One client waiting on one task: wait() returns when the task may have changed (a
    `final_only` waiter, a long-poll: when it may have become final)."""

    def __init__(self, task_id: int, *, final_only: bool):
        self.task_id = task_id
        self.final_only = final_only
        self.seen: TaskState | None = None  # the state the client last read (see saw())
        self._event = threading.Event()

    def saw(self, task: TaskRow) -> None:
        """The client read the task in this state: the safety net wakes it when it differs."""
        self.seen = (task["status"], task["progress"], task["attempts"])

    def wake(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        """True if woken (the task may have changed) before the timeout."""
        woken = self._event.wait(max(0.0, timeout))
        self._event.clear()
        return woken


class WatchHub:
    def __init__(self, task_store):
        self.store = task_store  # api.extensions.TaskStore: settings and this process's pool
        self.settings = task_store.settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._waiters: dict[int, set[Waiter]] = defaultdict(set)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.listening = threading.Event()  # the listener is connected (for tests and /readyz)
        self._stopping = threading.Event()

    def _db(self):
        return pooled_connection(self.store.pool())

    # --- the request side ----------------------------------------------------------------------

    def watch(self, task_id: int, *, final_only: bool) -> Waiter:
        """Start waiting on a task (register it first, then look at it: a change committed
        after the registration is announced; one before it is seen by the look)."""
        self._ensure_running()
        waiter = Waiter(task_id, final_only=final_only)
        with self._lock:
            first = not self._waiters[task_id]
            self._waiters[task_id].add(waiter)
        if first:
            try:
                with self._db() as conn:
                    task_watch(conn, task_ids=[task_id], watcher=self.name)
            except BaseException:
                self.unwatch(waiter, registered=False)
                raise
        return waiter

    def unwatch(self, waiter: Waiter, *, registered: bool = True) -> None:
        with self._lock:
            waiters = self._waiters.get(waiter.task_id)
            if waiters is None:
                return
            waiters.discard(waiter)
            last = not waiters
            if last:
                del self._waiters[waiter.task_id]
        if last and registered:
            try:
                with self._db() as conn:
                    task_unwatch(conn, task_ids=[waiter.task_id], watcher=self.name)
            except Exception as exc:  # the database went away: the workers prune a stale watch
                log.warning("could not unregister a watch on task %d: %s", waiter.task_id, exc)

    # --- the listening side --------------------------------------------------------------------

    def _ensure_running(self) -> None:
        """One listener per process, started on first use (gunicorn forks the workers after the
        app is made: a thread made before the fork would not run in them)."""
        if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return
            self._pid = os.getpid()
            self.name = f"{socket.gethostname()}:{self._pid}"
            self._thread = threading.Thread(target=self._run, name="skiplock-watch-hub", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop listening (the app is closed; waiting requests answer at their deadline)."""
        self._stopping.set()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(CLOSE_JOIN_SECONDS)

    def _run(self) -> None:
        last_check = last_refresh = time.monotonic()
        while not self._stopping.is_set():
            try:
                with connect(
                    self.settings.listen_database_url or self.settings.database_url,
                    role="api-listener",
                    timeout_seconds=self.settings.db_timeout_seconds,
                    guarded=False,
                ) as conn:
                    conn.execute(f"LISTEN {CHANGED_CHANNEL}")
                    self.listening.set()
                    self._wake_all()  # whatever changed while it was away
                    while not self._stopping.is_set():
                        for notify in conn.notifies(timeout=TICK_SECONDS, stop_after=1):
                            self._announced(notify.payload)
                        now = time.monotonic()
                        if now - last_check >= RECHECK_SECONDS:
                            last_check = now
                            self._recheck()
                        if now - last_refresh >= REFRESH_SECONDS:
                            last_refresh = now
                            self._refresh()
            except Exception as exc:  # the database went away: listen again shortly
                self.listening.clear()
                if self._stopping.is_set():
                    return
                log.warning(
                    "watch hub lost its connection (%s); reconnecting", str(exc).strip() or type(exc).__name__
                )
                self._stopping.wait(RECONNECT_SECONDS)
        self.listening.clear()

    def _announced(self, payload: str) -> None:
        if payload == "*":  # too many to name: look again at everything
            self._wake_all()
            return
        with self._lock:
            waiters = [
                w
                for task_id, final in parse_changes(payload)
                for w in self._waiters.get(task_id, ())
                if final or not w.final_only
            ]
        for waiter in waiters:
            waiter.wake()

    def _wake_all(self) -> None:
        with self._lock:
            waiters = [w for ws in self._waiters.values() for w in ws]
        for waiter in waiters:
            waiter.wake()

    def _recheck(self) -> None:
        """The safety net: wake the waiters whose task is not in the state they last read."""
        with self._lock:
            ids = list(self._waiters)
        if not ids:
            return
        with self._db() as conn:
            states = task_states(conn, ids)
        with self._lock:
            waiters = [w for task_id in ids for w in self._waiters.get(task_id, ())]
        for waiter in waiters:
            state = states.get(waiter.task_id)  # None: deleted
            if waiter.seen is None or waiter.seen == state:
                continue
            if not waiter.final_only or state is None or state[0] in FINAL_STATUSES:
                waiter.wake()

    def _refresh(self) -> None:
        """Keep the watches of long waits (event streams) from being pruned as stale."""
        with self._lock:
            ids = list(self._waiters)
        if ids:
            with self._db() as conn:
                task_watch(conn, task_ids=ids, watcher=self.name)


def parse_changes(payload: str) -> list[tuple[int, bool]]:
    """(task id, became final) of each task a skiplock_task_changed payload names: "12,13!"."""
    changes = []
    for part in payload.split(","):
        final = part.endswith("!")
        digits = part[:-1] if final else part
        if digits.isdigit():
            changes.append((int(digits), final))
    return changes
