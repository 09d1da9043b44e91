"""Exact quotas (issue 16, point 7): a key's max_unfinished holds with any number of API processes,
because each unfinished task of the key holds a slot numbered 1..max_unfinished of its own
(tasks_quota_slot_idx). Through
the real Flask app (two apps on one database: two processes' worth of state) and through real
gunicorn with two workers, sampled from the database while clients hammer one key whose queue is
paused; and what counts: a batch whole, a deduplicated task or a replay not at all, a retry as
one more. The cheap path is checked too: keys without a cap read nothing, a key with a large cap
far from it reads its slots only when a random one was taken, and no submit of a key waits for
another's commit."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from urllib.parse import urlsplit

import pytest

import api.limits
from skiplock import keys
from skiplock.sql.keys import task_quota_free_slots
from skiplock.sql.operations import task_queue_set_paused
from tests.helpers import Caller, assert_error, fail_task, row_count, start_gunicorn

CAP = 50


def unfinished(conn, key_id: int) -> int:
    return conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE owner_key_id = %s AND status IN ('pending', 'processing')",
        (key_id,),
    ).fetchone()["n"]


class Sampler:
    """Counts the key's unfinished tasks from the database, over and over, in a thread."""

    def __init__(self, conn, key_id: int):
        self.conn, self.key_id = conn, key_id
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(unfinished(self.conn, self.key_id))
            time.sleep(0.002)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def body(i: int) -> tuple[str, dict]:
    """One of the three submits, by turns: one task, one typed task, or a batch of 1 to 5."""
    if i % 3 == 0:
        return "/api/submit-task", {"task_input": i}
    if i % 3 == 1:
        return "/api/tasks", {"task_type": "noop", "task_input": i}
    return "/api/tasks/batch", {"tasks": [{"task_type": "noop", "task_input": i}] * (1 + i % 5)}


def test_two_api_processes_never_pass_the_cap(make_app, conn, new_key):
    """Two apps (each with its own bounds in memory, as two processes), six threads each,
    submitting and cancelling for a few seconds: sampled all along, the key never has more than
    CAP unfinished tasks, and ends with exactly CAP."""
    key = new_key(max_unfinished=CAP)
    task_queue_set_paused(conn, queue="default", paused=True, by="test")
    apps = [make_app(auth="on"), make_app(auth="on")]
    for app in apps:  # each makes its pool on its first request: one thread at a time
        assert Caller(app.test_client(), key.token).get("/api/tasks").status_code == 200
    deadline = time.monotonic() + 3.0
    outcomes: dict[int | str, int] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def hammer(n: int) -> None:
        caller = Caller(apps[n % 2].test_client(), key.token)
        rng = random.Random(n)
        mine: list[int] = []
        i = n
        while time.monotonic() < deadline:
            url, payload = body(i)
            response = caller.post(url, json=payload)
            answer = response.get_json()
            with lock:
                outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
            if response.status_code == 202:
                mine.extend(answer["task_ids"] if "task_ids" in answer else [answer["task_id"]])
            elif response.status_code != 429:
                errors.append(f"{response.status_code} {answer}")
            elif mine and rng.random() < 0.2:  # at the cap: free a place now and then
                task_id = mine.pop(rng.randrange(len(mine)))
                if caller.post(f"/api/tasks/{task_id}/cancel").status_code != 200:
                    errors.append(f"cancel {task_id}")
                with lock:
                    outcomes["cancelled"] = outcomes.get("cancelled", 0) + 1
            i += 2

    with Sampler(conn, key.id) as sampler:
        threads = [threading.Thread(target=hammer, args=(n,)) for n in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    assert outcomes.get(429, 0) > 0 and outcomes.get("cancelled", 0) > 20, outcomes
    assert len(sampler.samples) > 50
    assert max(sampler.samples) <= CAP, max(sampler.samples)
    # Cancels free room, and the last submits fill it: every single submit is refused only at the cap.
    caller = Caller(apps[0].test_client(), key.token)
    while caller.post("/api/submit-task", json={"task_input": "fill"}).status_code == 202:
        pass
    assert unfinished(conn, key.id) == CAP


def test_a_finish_seen_by_one_process_frees_room_in_another(make_app, conn, new_key):
    key = new_key(max_unfinished=3)
    first, second = (Caller(make_app(auth="on").test_client(), key.token) for _ in range(2))
    ids = [first.submit_id(i) for i in range(3)]
    assert_error(second.submit(), 429)
    assert_error(first.submit(), 429)
    assert first.post(f"/api/tasks/{ids[0]}/cancel").status_code == 200
    assert second.submit().status_code == 202  # at once: the bound would refuse, so it counts
    assert_error(first.submit(), 429)  # ... and the first process sees that task too
    assert unfinished(conn, key.id) == 3


def test_a_batch_counts_whole_across_processes(make_app, conn, new_key):
    key = new_key(max_unfinished=10)
    first, second = (Caller(make_app(auth="on").test_client(), key.token) for _ in range(2))

    def batch(caller: Caller, n: int):
        return caller.post(
            "/api/tasks/batch", json={"tasks": [{"task_type": "noop", "task_input": i} for i in range(n)]}
        )

    assert batch(first, 6).status_code == 202
    refused = batch(second, 5)
    assert "4 more" in assert_error(refused, 429)["message"]
    assert batch(second, 4).status_code == 202
    assert_error(batch(first, 1), 429)
    assert unfinished(conn, key.id) == 10


# --- what counts ---------------------------------------------------------------------------------


def test_a_deduplicated_submit_at_the_cap_answers_the_task_not_429(new_key, as_key, conn, subtests):
    caller = as_key(new_key(max_unfinished=2))
    one = caller.post("/api/submit-task", json={"task_input": 1, "unique_key": "one"}).get_json()["task_id"]
    two = caller.post("/api/tasks", json={"task_type": "noop", "task_input": 2, "unique_key": "two"})
    assert two.status_code == 202
    with subtests.test("single submits"):
        for url in ("/api/submit-task", "/api/tasks"):
            again = caller.post(url, json={"task_type": "noop", "task_input": 3, "unique_key": "one"})
            assert (again.status_code, again.get_json()["task_id"]) == (200, one)
            assert again.get_json()["deduplicated"] is True
            assert again.headers["RateLimit"] == '"unfinished";r=0'
    with subtests.test("a batch of duplicates only"):
        tasks = [
            {"task_type": "noop", "task_input": i, "unique_key": k}
            for i, k in enumerate(["two", "one", "two"])
        ]
        answer = caller.post("/api/tasks/batch", json={"tasks": tasks})
        assert answer.status_code == 202, answer.get_json()
        assert answer.get_json()["deduplicated"] == [True, True, True]
    with subtests.test("a batch with one new task is refused whole, and stores nothing"):
        tasks.append({"task_type": "noop", "task_input": 9, "unique_key": "three"})
        refused = caller.post("/api/tasks/batch", json={"tasks": tasks})
        assert "0 more" in assert_error(refused, 429)["message"]
        assert refused.headers["Retry-After"] == "1"
        assert refused.headers["RateLimit"] == '"unfinished";r=0'
    with subtests.test("a new unique_key is refused"):
        assert_error(caller.post("/api/submit-task", json={"task_input": 1, "unique_key": "new"}), 429)
    assert row_count(conn) == 2


def test_a_batch_with_duplicates_counts_only_its_new_tasks(new_key, as_key, conn):
    key = new_key(max_unfinished=3)
    caller = as_key(key)
    assert caller.post("/api/submit-task", json={"task_input": 0, "unique_key": "a"}).status_code == 202
    # Four tasks, two of them duplicates: two new ones fit in the two places left.
    tasks = [
        {"task_type": "noop", "task_input": i, "unique_key": k} for i, k in enumerate(["a", "b", "b", "c"])
    ]
    answer = caller.post("/api/tasks/batch", json={"tasks": tasks})
    assert answer.status_code == 202, answer.get_json()
    assert answer.get_json()["deduplicated"] == [True, False, True, False]
    assert answer.headers["RateLimit"] == '"unfinished";r=0'
    assert unfinished(conn, key.id) == 3


def test_a_retry_takes_a_place(new_key, as_key, conn):
    key = new_key(max_unfinished=2)
    caller = as_key(key)
    failed = caller.post("/api/submit-task", json={"task_input": 1, "max_attempts": 1}).get_json()["task_id"]
    assert fail_task(conn, failed) == "failed"
    caller.submit_id(2)
    caller.submit_id(3)
    refused = caller.post(f"/api/tasks/{failed}/retry")
    assert "0 more" in assert_error(refused, 429)["message"]
    assert refused.headers["RateLimit"] == '"unfinished";r=0'
    assert (
        conn.execute("SELECT status::text AS s FROM tasks WHERE id = %s", (failed,)).fetchone()["s"]
        == "failed"
    )

    pending = conn.execute("SELECT max(id) AS id FROM tasks").fetchone()["id"]
    assert caller.post(f"/api/tasks/{pending}/cancel").status_code == 200
    retried = caller.post(f"/api/tasks/{failed}/retry")
    assert retried.status_code == 200, retried.get_json()
    assert retried.headers["RateLimit"] == '"unfinished";r=0'
    assert_error(caller.submit(), 429)  # the retried task holds the place
    assert unfinished(conn, key.id) == 2


# --- the cheap path --------------------------------------------------------------------------------


@pytest.fixture
def slot_reads(monkeypatch):
    """How often the API reads a key's free quota slots."""
    calls = {"reads": 0}

    def counted(*args, **kwargs):
        calls["reads"] += 1
        return task_quota_free_slots(*args, **kwargs)

    monkeypatch.setattr(api.limits, "task_quota_free_slots", counted)
    return calls


def slots_held(conn, key_id: int) -> list[int]:
    return [
        r["quota_slot"]
        for r in conn.execute(
            "SELECT quota_slot FROM tasks WHERE owner_key_id = %s AND status IN ('pending', 'processing')"
            " ORDER BY quota_slot",
            (key_id,),
        )
    ]


def test_a_key_without_a_cap_pays_nothing(new_key, as_key, conn, slot_reads):
    key = new_key()
    caller = as_key(key)
    for url in ("/api/submit-task", "/api/tasks", "/api/tasks/batch"):
        assert caller.submit(url).status_code == 202
    assert slot_reads == {"reads": 0}
    assert set(slots_held(conn, key.id)) == {None}


def test_a_key_with_a_large_cap_far_from_it_reads_no_slots(new_key, as_key, conn, slot_reads):
    key = new_key(max_unfinished=1_000_000)
    caller = as_key(key)
    for i in range(20):
        assert caller.submit_id(i)
    assert slot_reads == {"reads": 0}
    held = slots_held(conn, key.id)
    assert len(held) == len(set(held)) == 20 and all(1 <= s <= 1_000_000 for s in held)


def test_a_random_slot_taken_is_read_and_picked_again(new_key, as_key, conn, slot_reads):
    """Every slot of 1..cap but one is held (by hand, as a crowd of submits would): a random
    pick fails, the submit reads the free slots and takes the last one; the next is refused."""
    cap = 2_000
    key = new_key(max_unfinished=cap)
    conn.execute(
        """INSERT INTO tasks (task_type, input, owner_key_id, quota_slot, turn)
           SELECT 'noop', 'null', %s, g, g FROM generate_series(2, %s) g""",
        (key.id, cap),
    )
    caller = as_key(key)
    answer = caller.submit()
    assert answer.status_code == 202, answer.get_json()
    assert slots_held(conn, key.id)[0] == 1
    assert_error(caller.submit(), 429)
    assert unfinished(conn, key.id) == cap
    assert slot_reads["reads"] >= 2  # (unless the random pick was 1: 1 chance in 2,000)


def test_a_batch_whose_random_slots_are_taken_reads_free_ones_and_counts_whole(new_key, as_key, conn):
    """A large cap that this process believes far (it never read the key's slots) but is nearly
    full: the batch's random slots are mostly taken, it reads the free ones and fits exactly;
    the next batch, one too many, is refused whole."""
    cap = 2_000
    key = new_key(max_unfinished=cap)
    conn.execute(
        """INSERT INTO tasks (task_type, input, owner_key_id, quota_slot, turn)
           SELECT 'noop', 'null', %s, g, g FROM generate_series(11, %s) g""",
        (key.id, cap),
    )
    caller = as_key(key)
    batch = {"tasks": [{"task_type": "noop", "task_input": i} for i in range(5)]}
    answer = caller.post("/api/tasks/batch", json=batch)
    assert answer.status_code == 202, answer.get_json()
    assert unfinished(conn, key.id) == cap - 5
    refused = caller.post(
        "/api/tasks/batch", json={"tasks": batch["tasks"] + [{"task_type": "noop", "task_input": 5}]}
    )
    assert_error(refused, 429)
    assert unfinished(conn, key.id) == cap - 5
    held = slots_held(conn, key.id)
    assert len(held) == len(set(held)) == cap - 5 and max(held) <= cap


def test_a_finished_task_frees_its_slot(new_key, as_key, conn):
    key = new_key(max_unfinished=2)
    caller = as_key(key)
    first, _ = caller.submit_id(0), caller.submit_id(1)
    assert_error(caller.submit(), 429)
    assert caller.post(f"/api/tasks/{first}/cancel").status_code == 200
    assert caller.submit().status_code == 202
    assert sorted(slots_held(conn, key.id)) == [1, 2]


# --- real gunicorn ---------------------------------------------------------------------------------


def post(conn: http.client.HTTPConnection, token: str, path: str, payload: dict) -> int:
    conn.request(
        "POST",
        path,
        body=json.dumps(payload),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    response = conn.getresponse()
    response.read()
    return response.status


def test_gunicorn_with_two_workers_holds_the_cap(auth_settings, conn):
    """The outside measurement of issue 16: WEB_CONCURRENCY=2, a key with max_unfinished 50 and
    its queue paused; one sequential client (a new connection per request, so both workers
    answer it), then, with room made again, eight clients at once. Never more than 50."""
    key = keys.create_key(conn, name="capped", role="client", max_unfinished=CAP)
    task_queue_set_paused(conn, queue="default", paused=True, by="test")
    proc, http_ = start_gunicorn(auth_settings, workers=2, quiet=True)
    address = urlsplit(http_.base)

    def connection() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(address.hostname or "", address.port, timeout=10)

    try:
        with Sampler(conn, key["id"]) as sampler:
            statuses = []
            for i in range(60):
                c = connection()
                statuses.append(post(c, key["token"], "/api/submit-task", {"task_input": i}))
                c.close()
            assert (statuses.count(202), statuses.count(429)) == (CAP, 10), statuses

            c = connection()
            for row in conn.execute("SELECT id FROM tasks ORDER BY id LIMIT 30").fetchall():
                assert post(c, key["token"], f"/api/tasks/{row['id']}/cancel", {}) == 200
            c.close()
            raced: list[int] = []

            def client(n: int) -> None:
                c = connection()
                for i in range(15):
                    url, payload = body(n * 15 + i)
                    raced.append(post(c, key["token"], url, payload))
                c.close()

            threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert set(raced) == {202, 429}, raced
        assert len(sampler.samples) > 20
        assert max(sampler.samples) <= CAP
        c = connection()
        while post(c, key["token"], "/api/submit-task", {"task_input": "fill"}) == 202:
            pass
        c.close()
        assert unfinished(conn, key["id"]) == CAP
    finally:
        proc.terminate()
        proc.wait(20)
