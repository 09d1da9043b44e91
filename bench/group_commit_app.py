"""A reference for the design skiplock does not use: bare Flask under gthread workers, where a
committer thread per process stores whatever requests are waiting in one INSERT and one commit
(group commit), then answers them. No validation, no flask-smorest: the ceiling of that design.

The bench runs it against bare_app.py under the same gthread settings, to show whether giving
up sync workers for group commit could bring submit throughput near bare Flask on this machine.
"""

import json
import os
import threading

from flask import Flask, request

from skiplock.db import connect
from skiplock.sql.inserts import NewTask, task_insert_many

app = Flask(__name__)


class GroupCommitter:
    def __init__(self, url: str):
        self._url = url
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._waiting: list[list] = []  # [task, answered lock, id]
        threading.Thread(target=self._commit_forever, daemon=True).start()

    def insert(self, task: NewTask) -> int:
        answered = threading.Lock()
        answered.acquire()
        entry = [task, answered, None]
        with self._lock:
            self._waiting.append(entry)
            self._arrived.notify()
        if not answered.acquire(timeout=10):
            raise TimeoutError("the committer did not answer")
        return entry[2]

    def _commit_forever(self) -> None:
        conn = connect(self._url, role="bench-group-commit")
        while True:
            with self._lock:
                while not self._waiting:
                    self._arrived.wait()
                batch, self._waiting = self._waiting, []
            ids = task_insert_many(conn, [entry[0] for entry in batch])
            for entry, task_id in zip(batch, ids, strict=True):
                entry[2] = task_id
                entry[1].release()


_committers: dict[int, GroupCommitter] = {}


def committer() -> GroupCommitter:
    if os.getpid() not in _committers:  # gunicorn forks: one thread per process, after the fork
        _committers[os.getpid()] = GroupCommitter(os.environ["DATABASE_URL"])
    return _committers[os.getpid()]


@app.post("/api/submit-task")
def submit():
    body = request.get_json()
    task = NewTask(
        task_type=body.get("task_type", "default"),
        input_json=json.dumps(body["task_input"]),
        queue="default",
        priority=0,
        max_attempts=3,
        timeout_seconds=60,
    )
    return {"task_id": committer().insert(task), "status": "pending"}, 202
