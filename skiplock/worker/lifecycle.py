"""What a task process says of itself rather than of its tasks (skiplock.worker.executor's pipe
protocol): it is ready, its setup failed, or it retires after a recycling limit. The tasks' books
stay in skiplock.worker.processes; this keeps the processes' own: the setup back-off, the log line
and count of each failure and recycle, and how long a retiring process may take to exit."""

from __future__ import annotations

import logging
import time

from skiplock.worker.executor import Report
from skiplock.worker.slots import RECYCLE_EXIT_SECONDS, ProcessSpawner, Slot
from skiplock.worker.stats import WorkerStats

log = logging.getLogger("skiplock.worker")


class ProcessLifecycle:
    def __init__(self, spawner: ProcessSpawner, stats: WorkerStats):
        self.spawner = spawner
        self.stats = stats

    def heard(self, slot: Slot, message: Report) -> bool:
        """Take in a process's news about itself; False for a report about its tasks (and for
        "ready", which the tasks' books need too)."""
        if message[0] == "ready":
            self.spawner.set_up(slot.index)  # its slot's next process starts without delay
            return False
        if message[0] == "setup_failed":
            self._setup_failed(slot, message[1], message[2])
            return True
        if message[0] == "retire":
            self._retiring(slot, message[1], message[2])
            return True
        return False

    def _setup_failed(self, slot: Slot, error: str, traceback: str) -> None:
        """The process exits having been sent nothing (claims wait for ready processes), so no
        task is charged; its slot's next process waits longer each time (setup_failed)."""
        delay = self.spawner.setup_failed(slot.index)
        log.error(
            "task process %d could not start: %s; the next one tries in %g s",
            slot.index,
            error,
            delay,
            extra={"traceback": traceback},
        )
        self.stats.event("process_setup_failures")

    def _retiring(self, slot: Slot, limit: str, why: str) -> None:
        """The process reached a recycling limit after reporting its last outcome: it is sent
        nothing more (the caller gives back the rest of its batch) and replaced once it exits."""
        queued = len(slot.queue)
        log.info(
            "task process %d (pid %s) is recycled: it %s%s",
            slot.index,
            slot.process.pid,
            why,
            f"; the {queued} tasks queued behind it go back, uncounted" if queued else "",
        )
        slot.ready = False
        slot.recycling_since = time.monotonic()
        self.stats.recycled(limit)

    def slow_to_exit(self, slots: list[Slot], now: float) -> list[Slot]:
        """Recycled processes whose teardowns have run longer than RECYCLE_EXIT_SECONDS: to kill."""
        slow = [
            s
            for s in slots
            if s.recycling_since is not None and now - s.recycling_since > RECYCLE_EXIT_SECONDS
        ]
        for slot in slow:
            log.warning(
                "task process %d (pid %s) did not exit within %g s of being recycled; killed",
                slot.index,
                slot.process.pid,
                RECYCLE_EXIT_SECONDS,
            )
        return slow
