"""What a worker did, counted in plain integers on its hot path, and shown two ways: Prometheus
metrics on its own port (`worker.py --metrics-port`), and the task_throughput table the dashboard
charts (added to every THROUGHPUT_FLUSH_SECONDS).

prometheus-client's own Counter and Histogram take a lock per call; at tens of thousands of tasks a
second that is measurable, so the loop counts in dictionaries and a collector turns them into
metric families when Prometheus scrapes.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from skiplock.sql.operations import Throughput, task_throughput_add
from skiplock.sql.rows import Connection
from skiplock.sql.workers import RescuedRow

log = logging.getLogger("skiplock.worker")

# The throughput rows are added to task_throughput this often (one statement for all).
THROUGHPUT_FLUSH_SECONDS = 10.0
# Task run times, seconds: from a no-op to a long computation.
RUN_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)
# A statement's round trip, as the supervisor waits on it.
STATEMENT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1)
# Tasks or outcomes per statement: from one to a full batch (WRITE_BATCH_MAX, RESCUE_BATCH).
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
OUTCOMES = ("completed", "failed", "timed_out", "crashed", "failed_for_good", "retry_requested")


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family_values(self) -> tuple[list[tuple[str, float]], float]:
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            cumulative += count
            buckets.append((str(bound), cumulative))
        buckets.append(("+Inf", cumulative + self.counts[-1]))
        return buckets, self.total


class WorkerStats:
    def __init__(self, worker_id: str, counters: dict[str, int]):
        self.worker_id = worker_id
        self.counters = counters  # the supervisor's (fenced_out is the writer's)
        self.started: dict[tuple[str, str], int] = defaultdict(int)  # (queue, task type)
        self.ended: dict[tuple[str, str, str], int] = defaultdict(int)  # (queue, task type, outcome)
        self.run_time: dict[str, _Histogram] = {}  # task type
        self.claim_sizes = _Histogram(BATCH_BUCKETS)
        self.write_sizes = _Histogram(BATCH_BUCKETS)
        self.hand_over_time = _Histogram(STATEMENT_BUCKETS)  # what each hand-over made the loop wait
        self.events: dict[str, int] = defaultdict(int)  # renewals, rescues, reconnects, ...
        self.rescued: dict[tuple[str, str, str], int] = defaultdict(int)  # (queue, type, lost|released)
        self.recycles: dict[str, int] = defaultdict(int)  # by the limit reached: tasks | memory
        self.unwritten = 0
        self.processes = 0
        self.busy = 0
        self._throughput: dict[tuple[str, str], list] = {}  # since the last flush
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()  # the writer thread counts its writes too

    # --- counting (the supervisor's loop) ------------------------------------------------------

    def task_started(self, queue: str, task_type: str) -> None:
        self.started[(queue, task_type)] += 1

    def task_ended(self, queue: str, task_type: str, outcome: str, seconds: float | None) -> None:
        self.ended[(queue, task_type, outcome)] += 1
        row = self._throughput.setdefault((queue, task_type), [0, 0, 0.0])
        row[0 if outcome == "completed" else 1] += 1
        if seconds is not None:
            row[2] += seconds
            histogram = self.run_time.get(task_type)
            if histogram is None:
                histogram = self.run_time[task_type] = _Histogram(RUN_BUCKETS)
            histogram.observe(seconds)

    def claimed(self, count: int) -> None:
        self.claim_sizes.observe(count)

    def wrote(self, count: int) -> None:
        with self._lock:
            self.write_sizes.observe(count)

    def event(self, name: str, count: int = 1) -> None:
        self.events[name] += count

    def recycled(self, limit: str) -> None:
        self.recycles[limit] += 1

    def rescued_tasks(self, rows: list[RescuedRow]) -> None:
        for row in rows:
            self.rescued[(row["queue"], row["task_type"], row["outcome"])] += 1

    # --- the throughput table (a duty of the loop) ---------------------------------------------

    def flush_throughput_if_due(self, db: Connection, now: float) -> None:
        if now - self._last_flush < THROUGHPUT_FLUSH_SECONDS:
            return
        self._last_flush = now
        rows, self._throughput = self._throughput, {}
        try:
            task_throughput_add(
                db,
                worker_id=self.worker_id,
                rows=[Throughput(q, t, done, failed, secs) for (q, t), (done, failed, secs) in rows.items()],
            )
        except psycopg.Error:
            # Put them back: the next flush adds them (the caller handles the connection).
            for key, (done, failed, secs) in rows.items():
                row = self._throughput.setdefault(key, [0, 0, 0.0])
                row[0] += done
                row[1] += failed
                row[2] += secs
            raise

    # --- Prometheus ----------------------------------------------------------------------------

    def serve(self, port: int, address: str) -> None:
        """Serve /metrics on a thread of this process (prometheus-client's own server)."""
        registry = CollectorRegistry(auto_describe=True)
        registry.register(WorkerCollector(self))
        start_http_server(port, addr=address, registry=registry)
        log.info("worker %s serves metrics on %s:%d", self.worker_id, address, port)


class WorkerCollector(Collector):
    def __init__(self, stats: WorkerStats):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        started = CounterMetricFamily(
            "skiplock_tasks_started", "Tasks this worker started running.", labels=["queue", "task_type"]
        )
        for (queue, task_type), n in list(s.started.items()):
            started.add_metric([queue, task_type], n)
        yield started
        for outcome in OUTCOMES:
            family = CounterMetricFamily(
                f"skiplock_tasks_{outcome}",
                f"Attempts on this worker that ended {outcome.replace('_', ' ')}.",
                labels=["queue", "task_type"],
            )
            for (queue, task_type, ended), n in list(s.ended.items()):
                if ended == outcome:
                    family.add_metric([queue, task_type], n)
            yield family
        for outcome, text in (
            (
                "lost",
                "Tasks of gone workers or lapsed leases this worker's rescue duty took back after they had started.",
            ),
            (
                "released",
                "Tasks this worker's rescue duty gave back uncounted: claimed by a gone worker, never started.",
            ),
        ):
            family = CounterMetricFamily(f"skiplock_tasks_{outcome}", text, labels=["queue", "task_type"])
            for (queue, task_type, rescued), n in list(s.rescued.items()):
                if rescued == outcome:
                    family.add_metric([queue, task_type], n)
            yield family
        run = HistogramMetricFamily(
            "skiplock_task_run_seconds", "How long tasks ran, by type.", labels=["task_type"]
        )
        for task_type, histogram in list(s.run_time.items()):
            buckets, total = histogram.family_values()
            run.add_metric([task_type], buckets, total)
        yield run
        for name, histogram, text in (
            ("skiplock_worker_claim_batch_size", s.claim_sizes, "Tasks per claim statement."),
            ("skiplock_worker_write_batch_size", s.write_sizes, "Outcomes per write statement."),
            (
                "skiplock_worker_hand_over_seconds",
                s.hand_over_time,
                "Hand-over statements (task_workers.in_hand, committed before tasks go to processes): their round trips.",
            ),
        ):
            sizes = HistogramMetricFamily(name, text)
            buckets, total = histogram.family_values()
            sizes.add_metric([], buckets, total)
            yield sizes
        for event, text in (
            ("lease_renewals", "Lease renewal statements."),
            ("rescue_rounds", "Rescue rounds run."),
            ("reconnects", "Reconnections to the database."),
            (
                "workflow_steps_taken",
                "Workflow steps this worker took itself, idle, in the transaction that released them.",
            ),
            ("process_setup_failures", "Task processes whose start (imports, @process_setup) failed."),
        ):
            yield CounterMetricFamily(f"skiplock_worker_{event}", text, value=s.events.get(event, 0))
        recycles = CounterMetricFamily(
            "skiplock_worker_process_recycles",
            "Task processes replaced after a recycling limit (SKIPLOCK_MAX_TASKS_PER_PROCESS: tasks, "
            "SKIPLOCK_MAX_MEMORY_PER_PROCESS_MB: memory).",
            labels=["limit"],
        )
        for limit in ("tasks", "memory"):
            recycles.add_metric([limit], s.recycles.get(limit, 0))
        yield recycles

        yield CounterMetricFamily(
            "skiplock_worker_fenced_out",
            "Outcomes not written: their task was no longer this worker's (cancelled or taken over).",
            value=s.counters.get("fenced_out", 0),
        )
        yield GaugeMetricFamily(
            "skiplock_worker_outcomes_unwritten", "Outcomes waiting to be written.", value=s.unwritten
        )
        yield GaugeMetricFamily("skiplock_worker_processes", "Task processes.", value=s.processes)
        yield GaugeMetricFamily(
            "skiplock_worker_processes_busy", "Task processes running a task.", value=s.busy
        )
