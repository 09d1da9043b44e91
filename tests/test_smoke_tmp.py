from tests.conftest import insert_task, task_row, wait_until


def test_worker_runs_a_task(conn, start_worker):
    task_id = insert_task(conn, "greet", {"name": "x"})
    start_worker()
    row = wait_until(lambda: (r := task_row(conn, task_id))["status"] == "completed" and r)
    assert row["result"] == {"greeting": "Hello, x!", "attempt": 1}
