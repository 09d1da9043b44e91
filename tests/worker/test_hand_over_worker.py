"""The history never hides a run, with real worker.py processes: a worker that dies (SIGKILL) as
its task returns, before it can store anything of it, has that attempt counted as started (lost),
not released; what it had claimed and not handed to a process still goes back uncounted."""

from __future__ import annotations

from skiplock.sql.tasks import task_attempts_list
from tests.helpers import insert_task, task_row, wait_until


def wait_status(conn, task_id: int, status: str, timeout: float = 20.0) -> dict:
    return wait_until(
        lambda: (row := task_row(conn, task_id))["status"] == status and row,
        timeout=timeout,
        message=f"task {task_id} to be {status}",
    )


def test_a_task_that_ran_to_its_end_on_a_worker_that_died_counts_as_started(
    conn, worker_process, start_worker
):
    """The task ran well under the 10 ms after which a start is stored on its own, and its
    outcome never left the dead worker: only the hand-over, recorded before the task was sent to
    its process, tells that it ran. Without it the attempt was `released` (uncounted) and a task
    that takes its whole host down would be retried forever."""
    victim = worker_process("--concurrency", "1")
    task_id = insert_task(conn, "kill_worker", {"pid": victim.pid}, max_attempts=3)
    assert victim.wait(20) == -9  # killed by its own task
    # The rescue duty of another worker takes the task back once the dead one's session is gone.
    start_worker(concurrency=1)

    row = wait_status(conn, task_id, "completed")
    assert row["attempts"] == 2  # the dead worker's run counts
    first, second = task_attempts_list(conn, task_id)
    assert (first["attempt"], first["outcome"]) == (1, "lost")
    assert first["started_at"] is not None
    assert (second["attempt"], second["outcome"]) == (2, "completed")


def test_what_a_dead_worker_had_not_handed_to_a_process_goes_back_uncounted(
    conn, worker_process, start_worker
):
    """One process, busy with a long task: the tasks claimed behind it wait in the worker and were
    never handed over. The worker dies; they are released (uncounted), the long one is lost."""
    victim = worker_process("--concurrency", "1")
    # Teach it that noops are short, so that it claims ahead of its one busy process.
    for task_id in [insert_task(conn, "noop") for _ in range(3)]:
        wait_status(conn, task_id, "completed")
    long_task = insert_task(conn, "sleep", {"seconds": 30}, max_attempts=3)
    wait_until(lambda: task_row(conn, long_task)["started_at"] is not None, message="the long task to start")
    waiting = insert_task(conn, "noop", max_attempts=1)
    wait_until(lambda: task_row(conn, waiting)["status"] == "processing", message="the worker to claim it")
    in_hand = conn.execute(
        "SELECT w.in_hand, w.in_hand_attempts FROM task_workers w JOIN tasks t ON t.worker_id = w.worker_id "
        "WHERE t.id = %s",
        (waiting,),
    ).fetchone()
    assert (in_hand["in_hand"], in_hand["in_hand_attempts"]) == ([long_task], [1])  # not the waiting one

    victim.kill()
    victim.wait(10)
    start_worker(concurrency=1)

    row = wait_status(conn, waiting, "completed")
    assert row["attempts"] == 1
    assert [a["outcome"] for a in task_attempts_list(conn, waiting)] == ["released", "completed"]
    wait_until(lambda: task_attempts_list(conn, long_task), message="the long task's lost attempt")
    assert [a["outcome"] for a in task_attempts_list(conn, long_task)][:1] == ["lost"]


def test_nothing_is_sent_ahead_behind_a_task_running_past_its_estimate(conn, start_worker):
    """A busy process gets its next batch shortly before its work runs out, by its task types'
    measured times. A task of a short type that runs long (stuck, or just slow this time) must
    not have the next short tasks queued behind it: they go to the other process."""
    start_worker(concurrency=2)
    for task_id in [insert_task(conn, "sleep", {"seconds": 0.001}) for _ in range(6)]:
        wait_status(conn, task_id, "completed")  # sleep is now known to be short
    slow = insert_task(conn, "sleep", {"seconds": 4})
    wait_until(lambda: task_row(conn, slow)["started_at"] is not None, message="the slow one to start")
    quick = [insert_task(conn, "sleep", {"seconds": 0.001}) for _ in range(20)]
    for task_id in quick:
        wait_status(conn, task_id, "completed", timeout=3)
    assert task_row(conn, slow)["status"] == "processing"  # they did not wait for it
