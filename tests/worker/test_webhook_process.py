"""The webhook sender in a process of its own: the worker's (started again if it dies), or
`skiplock webhooks` alone while workers run with SKIPLOCK_WEBHOOK_SENDER=off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from skiplock.settings import Settings
from tests.helpers import ROOT, insert_task, settings_env, task_row, wait_until


def delivered(conn, task_id: int) -> bool:
    row = conn.execute(
        "SELECT bool_and(status = 'delivered') AS done, count(*) AS n FROM webhook_deliveries WHERE task_id = %s",
        (task_id,),
    ).fetchone()
    return bool(row["n"] and row["done"])


def test_the_workers_sender_process_is_started_again_when_it_dies(
    conn, receiver, hook_settings, start_worker
):
    worker = start_worker(**vars(hook_settings))
    first = insert_task(conn, "noop", callback_url=receiver.url)
    receiver.copies(1)
    sender = worker.supervisor.webhooks
    assert sender is not None and sender.pid not in (None, os.getpid())

    os.kill(sender.pid, signal.SIGKILL)
    second = insert_task(conn, "noop", callback_url=receiver.url)

    # after the restart (checked every 5 s); the sender marks a copy delivered only once its
    # receiver has answered, so the row may lag the copy the receiver already holds
    wait_until(lambda: delivered(conn, first) and delivered(conn, second), timeout=30)
    assert sender.restarts >= 1
    assert {task_row(conn, t)["status"] for t in (first, second)} == {"completed"}
    copied = {json.loads(copy.body)["data"]["task_id"] for copy in receiver.received}
    assert copied == {first, second}  # the killed sender's copy may have gone twice, never none


def test_skiplock_webhooks_sends_for_workers_that_do_not(conn, receiver, hook_settings, worker_process):
    worker_process(**{**vars(hook_settings), "webhook_sender": "off"})
    task_id = insert_task(conn, "noop", callback_url=receiver.url)
    wait_until(lambda: task_row(conn, task_id)["status"] == "completed")
    time.sleep(1.0)
    assert receiver.received == [] and not delivered(conn, task_id)  # nobody sends

    sender = subprocess.Popen(
        [sys.executable, "-m", "skiplock.cli", "webhooks"],
        env=settings_env(hook_settings),
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        receiver.copies(1, timeout=30)
        wait_until(lambda: delivered(conn, task_id))
    finally:
        sender.send_signal(signal.SIGTERM)
        _, stderr = sender.communicate(timeout=30)
    assert sender.returncode == 0, stderr
    assert "webhook sender" in stderr and "stopped" in stderr


def test_the_sender_setting_is_checked():
    with pytest.raises(ValueError, match="SKIPLOCK_WEBHOOK_SENDER"):
        Settings.from_env({"DATABASE_URL": "postgresql://x@127.0.0.1/x", "SKIPLOCK_WEBHOOK_SENDER": "thread"})
    assert Settings.from_env({"SKIPLOCK_WEBHOOK_SENDER": "off"}).webhook_sender == "off"
