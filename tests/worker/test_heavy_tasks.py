"""Heavy tasks through real worker.py processes: types declared apart from their code (the
implementation module is imported in task processes only), a setup hook run once per process and
its teardown, recycling after N tasks or above a memory limit, the spawn start method, a failing
setup, and the result size limit (docs/heavy-tasks.md)."""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from skiplock.settings import Settings
from skiplock.sql.tasks import task_attempts_list
from tests.helpers import free_port, insert_task, spawn_worker, task_row, wait_until

HEAVY = ("tests.heavy_declared_tasks",)


@pytest.fixture
def hook_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the task processes of workers started by this test record their hooks."""
    path = tmp_path / "hooks.log"
    monkeypatch.setenv("HEAVY_TASKS_HOOK_LOG", str(path))  # passed on by spawn_worker
    return path


@pytest.fixture
def run_worker(settings: Settings, hook_log: Path, tmp_path: Path):
    """run_worker(**overrides) -> (process, path of its stderr): worker.py with the heavy task
    modules, its task processes recording their hooks in hook_log; stopped (SIGTERM) at teardown."""
    procs = []

    def start(**overrides):
        stderr_path = tmp_path / f"worker-{len(procs)}.log"
        with open(stderr_path, "w") as stderr:
            proc = spawn_worker(replace(settings, task_modules=HEAVY, **overrides), stderr=stderr)
        procs.append(proc)
        return proc, stderr_path

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except Exception:
                proc.kill()
                proc.wait()


def hooks(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return [(event, int(pid)) for event, pid in (line.split() for line in path.read_text().splitlines())]


def wait_completed(conn, task_ids: list[int], timeout: float = 60.0) -> list[dict]:
    def done():
        rows = [task_row(conn, t) for t in task_ids]
        return all(r["status"] in ("completed", "failed") for r in rows) and rows

    return wait_until(done, timeout=timeout, message=f"tasks {task_ids} to finish")


def embed_tasks(conn, n: int) -> list[int]:
    return [insert_task(conn, "heavy_embed", {"text": f"text {i}"}) for i in range(n)]


def assert_ran_once_each(conn, rows: list[dict]) -> None:
    """Every task completed by its first attempt, with one attempt in its history."""
    for row in rows:
        assert row["status"] == "completed", row
        assert row["attempts"] == 1, row
        [attempt] = task_attempts_list(conn, row["id"])
        assert attempt["outcome"] == "completed"


def test_setup_runs_once_per_process_and_its_result_reaches_the_tasks(conn, run_worker, hook_log):
    worker, _ = run_worker(concurrency=2)
    rows = wait_completed(conn, embed_tasks(conn, 12))

    assert_ran_once_each(conn, rows)
    results = [r["result"] for r in rows]
    pids = {r["pid"] for r in results}
    assert len(pids) <= 2
    for result in results:
        # Imported and set up in the task process itself: not in the forkserver it was forked
        # from (its parent), not in the supervisor.
        assert result["imported_by"] == result["model_loaded_by"] == result["pid"]
        assert result["parent_pid"] != worker.pid
    setups = Counter(pid for event, pid in hooks(hook_log) if event == "setup")
    assert pids <= set(setups)
    assert all(count == 1 for count in setups.values())
    # A graceful stop asks each process to exit: each that ran tasks runs its teardown, once.
    worker.terminate()
    assert worker.wait(30) == 0
    events = hooks(hook_log)
    teardowns = Counter(pid for event, pid in events if event == "teardown")
    assert all(teardowns[pid] == 1 for pid in pids)
    assert all(events.index(("setup", pid)) < events.index(("teardown", pid)) for pid in teardowns)


def test_recycling_after_n_tasks_gives_new_processes_and_runs_every_task_once(conn, run_worker, hook_log):
    port = free_port()
    task_ids = embed_tasks(conn, 8)  # claimed in batches: some wait behind a retiring process
    _, stderr = run_worker(concurrency=1, max_tasks_per_process=3, metrics_port=port)
    rows = wait_completed(conn, task_ids)

    assert_ran_once_each(conn, rows)
    by_pid = Counter(r["result"]["pid"] for r in rows)
    assert sorted(by_pid.values()) == [2, 3, 3]  # one slot: three processes in turn
    # Each recycled process ran its teardown (after its setup).
    recycled = [pid for pid, count in by_pid.items() if count == 3]
    wait_until(lambda: all(("teardown", pid) in hooks(hook_log) for pid in recycled), message="teardowns")
    for pid in recycled:
        events = hooks(hook_log)
        assert events.index(("setup", pid)) < events.index(("teardown", pid))
    log = stderr.read_text()
    assert "is recycled: it ran 3 tasks (SKIPLOCK_MAX_TASKS_PER_PROCESS=3)" in log

    def recycles() -> float:
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        [count] = re.findall(
            r'^skiplock_worker_process_recycles_total\{limit="tasks"\} (\S+)$', metrics, re.M
        )
        return float(count)

    # The last retirement may be read just after its task's outcome was written.
    wait_until(lambda: recycles() >= len(recycled), message="the recycles to be counted")


def test_a_process_above_the_memory_limit_is_recycled_after_its_task(conn, run_worker):
    _, stderr = run_worker(concurrency=1, max_memory_per_process_mb=300)
    leak = insert_task(conn, "heavy_allocate", {"mb": 400})
    [leaked] = wait_completed(conn, [leak])
    after = embed_tasks(conn, 2)
    rows = wait_completed(conn, after)

    assert_ran_once_each(conn, [leaked, *rows])
    [pid_after] = {r["result"]["pid"] for r in rows}  # under the limit: one process ran both
    assert pid_after != leaked["result"]["pid"]
    assert "over SKIPLOCK_MAX_MEMORY_PER_PROCESS_MB=300" in stderr.read_text()


def test_the_spawn_start_method_runs_tasks_in_processes_of_the_supervisor(conn, run_worker, hook_log):
    worker, _ = run_worker(concurrency=1, start_method="spawn")
    rows = wait_completed(conn, embed_tasks(conn, 3))

    assert_ran_once_each(conn, rows)
    for row in rows:
        # No forkserver in between: the supervisor started the process itself.
        assert row["result"]["parent_pid"] == worker.pid
        assert row["result"]["imported_by"] == row["result"]["model_loaded_by"] == row["result"]["pid"]
    assert {pid for event, pid in hooks(hook_log) if event == "setup"} == {rows[0]["result"]["pid"]}


def test_a_failing_setup_is_one_line_backs_off_and_charges_no_task(conn, settings, tmp_path):
    stderr_path = tmp_path / "worker.log"
    failing = replace(settings, task_modules=("tests.failing_setup_tasks",), concurrency=1)
    task_id = insert_task(conn, "needs_broken_model", None)
    with open(stderr_path, "w") as stderr:
        worker = spawn_worker(failing, stderr=stderr)
    try:

        def failures() -> list[str]:
            return [line for line in stderr_path.read_text().splitlines() if "could not start" in line]

        lines = wait_until(
            lambda: len(failures()) >= 2 and failures(), timeout=30, message="two setup failures"
        )
        assert (
            "process_setup broken_model() raised FileNotFoundError: model file /models/missing.bin not found"
            in (lines[0])
        )
        # Each failure waits longer before the next try: no loop.
        assert lines[0].endswith("the next one tries in 1 s")
        assert lines[1].endswith("the next one tries in 2 s")
        assert "Traceback" not in stderr_path.read_text()
        row = task_row(conn, task_id)
        assert (row["status"], row["attempts"]) == ("pending", 0)
        assert task_attempts_list(conn, task_id) == []
        assert worker.poll() is None  # still up: other slots, or a fixed setup, would run
    finally:
        worker.terminate()
        worker.wait(30)


def test_an_over_size_result_fails_naming_the_limit_and_a_smaller_one_completes(conn, run_worker):
    run_worker(concurrency=1, max_result_bytes=1000)
    too_big = insert_task(conn, "sized_result", 2000, max_attempts=1)
    fits = insert_task(conn, "sized_result", 900)
    big, small = wait_completed(conn, [too_big, fits])

    assert small["status"] == "completed" and small["result"] == "x" * 900
    assert big["status"] == "failed"
    assert big["result"] is None
    assert "result is 2,002 bytes, over SKIPLOCK_MAX_RESULT_BYTES (1,000)" in big["error"]
