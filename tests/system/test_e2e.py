"""End to end, as deployed: real gunicorn serving wsgi:app, real `python worker.py`, real HTTP."""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers import start_gunicorn, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def gunicorn(settings):
    proc, http = start_gunicorn(settings)
    try:
        yield proc, http
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(20)


def test_submit_poll_and_fetch_through_gunicorn_and_worker_py(gunicorn, worker_process):
    server, http = gunicorn
    worker = worker_process("--concurrency", "2")

    code, headers, body = http.request("POST", "/api/submit-task", {"task_input": "Some input data"})
    assert code == 202
    assert body["status"] == "pending"
    task_id = body["task_id"]
    assert headers["Location"].endswith(f"/api/task-status/{task_id}")

    heavy = [
        http.request("POST", "/api/tasks", {"task_type": "primes", "task_input": {"limit": 200_000}})[2][
            "task_id"
        ]
        for _ in range(4)
    ]
    failing = http.request(
        "POST", "/api/submit-task", {"task_type": "fail", "task_input": {"times": 5}, "max_attempts": 2}
    )[2]["task_id"]

    def finished(tid):
        code, _, status = http.request("GET", f"/api/task-status/{tid}")
        assert code == 200
        return status["status"] in ("completed", "failed") and status

    status = wait_until(lambda: finished(task_id), message="default task")
    assert status["status"] == "completed"
    assert status["attempts"] == 1
    code, _, result = http.request("GET", f"/api/task-result/{task_id}")
    assert code == 200
    assert result["result"]["uppercase"] == "SOME INPUT DATA"

    for tid in heavy:
        assert wait_until(lambda tid=tid: finished(tid), message="primes")["result"]["count"] == 17984

    failed = wait_until(lambda: finished(failing), message="failing task")
    assert failed["status"] == "failed"
    code, _, body = http.request("GET", f"/api/task-result/{failing}")
    assert code == 409
    assert body["status"] == "failed"
    assert body["error"] == "TaskFailed: planned failure"

    # Both stop cleanly on SIGTERM.
    worker.send_signal(signal.SIGTERM)
    server.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0
    assert server.wait(20) == 0


def test_api_answers_while_no_worker_runs_and_the_task_waits(gunicorn):
    _, http = gunicorn
    code, _, body = http.request("POST", "/api/submit-task", {"task_input": {"n": 1}})
    assert code == 202
    time.sleep(0.3)
    code, headers, body = http.request("GET", f"/api/task-result/{body['task_id']}")
    assert code == 409
    assert body["status"] == "pending"
    assert int(headers["Retry-After"]) >= 1
    code, _, _ = http.request("GET", "/readyz")
    assert code == 200


def test_two_apis_run_by_one_user_do_not_disturb_each_other(settings, tmp_path):
    """gunicorn 27 keeps a control socket at $HOME/.gunicorn/gunicorn.ctl and removes whatever is
    there when it starts and stops: two instances of one user broke each other's. Ours has none."""
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": ""}
    first, first_http = start_gunicorn(settings, workers=1, env=env)
    try:
        second, second_http = start_gunicorn(settings, workers=1, env=env)
        assert second_http.request("GET", "/healthz")[0] == 200
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
        assert first_http.request("GET", "/healthz")[0] == 200
        assert not (tmp_path / ".gunicorn").exists()
        assert list(tmp_path.iterdir()) == []
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0
