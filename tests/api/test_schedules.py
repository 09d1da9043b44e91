"""Schedules through the API (issue 17, point 1): made, read, changed, paused, resumed, run now
and deleted by the real Flask app on a real Postgres, scoped to the calling key; bad input is a
422 naming the field, and changes nothing. Fires are made by the engine's own round, as a worker
makes them."""

from __future__ import annotations

import pytest

from skiplock.sql.schedule_fires import schedules_fire_due
from tests.helpers import assert_error

URL = "/api/schedules"
NIGHTLY = {
    "name": "nightly",
    "cron": "0 2 * * *",
    "timezone": "Europe/Paris",
    "task": {"task_type": "greet", "task_input": {"name": "Ada"}, "queue": "reports", "priority": 3},
}


def rows(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()["n"]


def due_now(conn, schedule_id: int) -> None:
    conn.execute("UPDATE task_schedules SET next_fire_at = now() WHERE id = %s", (schedule_id,))


@pytest.fixture
def bob(new_key, as_key):
    return as_key(new_key(name="bob"))


@pytest.fixture
def admin(new_key, as_key):
    return as_key(new_key("admin", name="ops"))


def test_a_schedule_is_made_with_its_next_runs_and_its_tasks_defaults(alice, conn):
    response = alice.post(URL, json=NIGHTLY)
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    assert response.headers["Location"].endswith(f"/api/schedules/{body['schedule_id']}")
    assert (body["name"], body["cron"], body["every_seconds"], body["timezone"]) == (
        "nightly", "0 2 * * *", None, "Europe/Paris",
    )  # fmt: skip
    assert (body["missed"], body["overlap"], body["paused"], body["declared_in_code"]) == (
        "skip",
        "allow",
        False,
        False,
    )
    greet = alice.client.application.extensions["skiplock"].registry.get("greet")
    assert (body["task"]["max_attempts"], body["task"]["timeout_seconds"]) == (
        greet.max_attempts,
        greet.timeout_seconds,
    )
    assert len(body["next_runs"]) == 5 and body["next_runs"][0]["at"] == body["next_fire_at"]
    assert body["next_fire_at"].endswith(("01:00:00+00:00", "00:00:00+00:00"))  # 02:00 in Paris
    assert body["last_fires"] == []
    assert alice.get(f"{URL}/{body['schedule_id']}").get_json() == body
    assert [s["name"] for s in alice.get(URL).get_json()["schedules"]] == ["nightly"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"every_seconds": 10}, "cron"),  # both
        ({"cron": None}, "cron"),  # neither
        ({"cron": "0 25 * * *"}, "cron"),
        ({"timezone": "Atlantis/Capital"}, "timezone"),
        ({"name": "has space"}, "name"),
        ({"missed": "sometimes"}, "missed"),
        ({"every_seconds": 0, "cron": None}, "every_seconds"),
    ],
)
def test_a_bad_schedule_is_a_422_naming_its_field_and_makes_nothing(alice, conn, change, field):
    body = assert_error(alice.post(URL, json={**NIGHTLY, **change}), 422)
    assert field in body["errors"]["json"], body
    assert rows(conn, "task_schedules") == 0


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ({"task_type": "no-such-type", "task_input": None}, "task_type"),
        ({"task_type": "greet", "task_input": {"nom": "Ada"}}, "task_input"),
        ({"task_type": "greet", "task_input": {"name": "Ada"}, "run_at": "2030-01-01T00:00:00Z"}, "run_at"),
        ({"task_type": "greet", "task_input": {"name": "Ada"}, "callback_url": "ftp://x"}, "callback_url"),
    ],
)
def test_the_task_of_a_schedule_is_checked_as_a_submit(alice, conn, task, field):
    body = assert_error(alice.post(URL, json={**NIGHTLY, "task": task}), 422)
    assert field in body["errors"]["json"]["task"], body
    assert rows(conn, "task_schedules") == 0


def test_a_name_is_unique_per_owner(alice, bob):
    assert alice.post(URL, json=NIGHTLY).status_code == 201
    assert "exists already" in assert_error(alice.post(URL, json=NIGHTLY), 409)["message"]
    assert bob.post(URL, json=NIGHTLY).status_code == 201  # another owner's namespace


def test_another_keys_schedule_answers_as_one_that_does_not_exist(alice, bob, admin, conn):
    sid = alice.post(URL, json=NIGHTLY).get_json()["schedule_id"]
    before = conn.execute("SELECT * FROM task_schedules WHERE id = %s", (sid,)).fetchone()
    for method, url, kwargs in (
        ("get", f"{URL}/{sid}", {}),
        ("patch", f"{URL}/{sid}", {"json": {"overlap": "skip"}}),
        ("delete", f"{URL}/{sid}", {}),
        ("post", f"{URL}/{sid}/pause", {}),
        ("post", f"{URL}/{sid}/resume", {}),
        ("post", f"{URL}/{sid}/run", {}),
    ):
        mine = assert_error(bob.open(method, url, **kwargs), 404)
        missing = assert_error(bob.open(method, url.replace(f"/{sid}", f"/{sid + 99}"), **kwargs), 404)
        assert mine["message"].replace(str(sid), "N") == missing["message"].replace(str(sid + 99), "N")
    assert bob.get(URL).get_json() == {"schedules": []}
    assert conn.execute("SELECT * FROM task_schedules WHERE id = %s", (sid,)).fetchone() == before
    assert rows(conn, "tasks") == 0
    assert [s["schedule_id"] for s in admin.get(URL).get_json()["schedules"]] == [sid]  # an admin sees all


def test_a_change_of_rule_moves_the_next_fire_and_a_bad_one_changes_nothing(alice, conn):
    made = alice.post(URL, json=NIGHTLY).get_json()
    url = f"{URL}/{made['schedule_id']}"
    changed = alice.patch(url, json={"every_seconds": 60, "overlap": "skip"}).get_json()
    assert (changed["cron"], changed["every_seconds"], changed["overlap"]) == (None, 60, "skip")
    assert changed["next_fire_at"] != made["next_fire_at"] and changed["next_fire_at"].endswith(":00+00:00")
    assert_error(alice.patch(url, json={"timezone": "Nowhere/Land"}), 422)
    assert_error(alice.patch(url, json={"task": {"task_type": "greet", "task_input": {}}}), 422)
    assert alice.get(url).get_json()["every_seconds"] == 60


def test_run_now_creates_a_task_of_the_key_and_records_the_fire(alice, bob, conn):
    sid = alice.post(URL, json={**NIGHTLY, "overlap": "skip"}).get_json()["schedule_id"]
    response = alice.post(f"{URL}/{sid}/run")
    assert response.status_code == 202, response.get_json()
    fire = response.get_json()
    assert (fire["outcome"], fire["kind"]) == ("created", "manual")
    assert response.headers["Location"].endswith(f"/api/tasks/{fire['task_id']}")
    task = alice.get(f"/api/tasks/{fire['task_id']}").get_json()
    assert (task["schedule_id"], task["scheduled_for"]) == (sid, fire["scheduled_for"])
    assert (task["task_type"], task["queue"], task["priority"], task["task_input"]) == (
        "greet",
        "reports",
        3,
        {"name": "Ada"},
    )
    assert_error(bob.get(f"/api/tasks/{fire['task_id']}"), 404)
    stored = conn.execute(
        "SELECT schedule_id, owner_key_id FROM tasks WHERE id = %s", (fire["task_id"],)
    ).fetchone()
    assert stored["schedule_id"] == sid and stored["owner_key_id"] is not None
    # overlap skip: the first run is unfinished, so a second makes nothing and says why
    refused = assert_error(alice.post(f"{URL}/{sid}/run"), 409)
    assert f"task {fire['task_id']}" in refused["message"] and refused["outcome"] == "skipped"
    assert rows(conn, "tasks") == 1
    last = alice.get(f"{URL}/{sid}").get_json()["last_fires"]
    assert [f["outcome"] for f in last] == ["skipped", "created"]


def test_a_fire_over_the_keys_quota_is_refused_and_recorded(new_key, as_key, conn):
    capped = as_key(new_key(name="capped", max_unfinished=1))
    sid = capped.post(URL, json=NIGHTLY).get_json()["schedule_id"]
    assert capped.post(f"{URL}/{sid}/run").status_code == 202
    body = assert_error(capped.post(f"{URL}/{sid}/run"), 409)
    assert "max_unfinished is 1" in body["message"] and rows(conn, "tasks") == 1
    due_now(conn, sid)
    schedules_fire_due(conn, by="worker-1")
    fires = capped.get(f"{URL}/{sid}").get_json()["last_fires"]
    assert (
        fires[0]["outcome"] == "refused"
        and fires[0]["fired_by"] == "worker-1"
        and "quota" in fires[0]["reason"]
    )


def test_a_paused_schedule_is_not_fired_and_resumes_later(alice, conn):
    sid = alice.post(URL, json={**NIGHTLY, "cron": None, "every_seconds": 1}).get_json()["schedule_id"]
    assert alice.post(f"{URL}/{sid}/pause").get_json()["paused"] is True
    due_now(conn, sid)
    assert schedules_fire_due(conn, by="w") == []
    resumed = alice.post(f"{URL}/{sid}/resume").get_json()
    assert resumed["paused"] is False
    schedules_fire_due(conn, by="w")
    assert all(f["outcome"] != "missed" for f in alice.get(f"{URL}/{sid}").get_json()["last_fires"])


def test_a_fire_shows_in_the_schedule_and_delete_keeps_its_tasks(alice, conn):
    sid = alice.post(URL, json=NIGHTLY).get_json()["schedule_id"]
    due_now(conn, sid)
    (fire,) = schedules_fire_due(conn, by="w")
    shown = alice.get(f"{URL}/{sid}").get_json()["last_fires"]
    assert [(f["outcome"], f["kind"], f["task_id"]) for f in shown] == [("created", "on_time", fire.task_id)]
    assert alice.delete(f"{URL}/{sid}").status_code == 204
    assert_error(alice.get(f"{URL}/{sid}"), 404)
    assert rows(conn, "task_schedule_fires") == 0 and rows(conn, "tasks") == 1
    assert_error(alice.get(f"{URL}/not-a-number"), 404)


def test_a_time_daylight_saving_skips_is_explained(alice, conn):
    sid = alice.post(URL, json={**NIGHTLY, "cron": "30 2 * * *", "timezone": "America/New_York"}).get_json()[
        "schedule_id"
    ]
    conn.execute("UPDATE task_schedules SET next_fire_at = '2027-03-13 07:30+00' WHERE id = %s", (sid,))
    runs = alice.get(f"{URL}/{sid}").get_json()["next_runs"]
    assert (
        runs[0]["note"] is None
        and "daylight saving" in runs[1]["note"]
        and runs[1]["at"].startswith("2027-03-14T07:00")
    )
