"""Schedules (issue 17, point 1), in the engine: the rules (cron in a timezone, intervals, daylight
saving, missed policies) and the fires on a real database: each fire time makes exactly one
task, whatever number of hosts fire at once; overlap skip, quotas, revoked owners, unique keys
and the database's own refusals are recorded with their reason; pause, resume, run now, the
schedules declared in code, retention."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from skiplock.db import connect
from skiplock.errors import ScheduleDeclaredInCode, ScheduleNameTaken, ScheduleNotFound
from skiplock.registry import DeclaredSchedule
from skiplock.schedules import Policy, Rule, ScheduleRefused, plan_round
from skiplock.sql.schedule_fires import schedule_run_now, schedules_fire_due
from skiplock.sql.schedules import (
    schedule_create,
    schedule_delete,
    schedule_fires,
    schedule_fires_prune,
    schedule_get,
    schedule_list,
    schedule_set_paused,
    schedule_update,
    schedule_view,
    schedules_next_due_in,
    schedules_sync_declared,
)
from tests.helpers import add_key, insert_task

NOOP = {"task_type": "noop", "task_input": None, "queue": "default", "priority": 0, "max_attempts": 3,
        "timeout_seconds": 30}  # fmt: skip
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# --- the rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "field", "says"),
    [
        ({"cron": "* * *"}, "cron", "5 fields"),
        ({"cron": "61 * * * *"}, "cron", "out of range"),
        ({"cron": "* * * * * * *"}, "cron", "has 7"),
        ({"every_seconds": 0}, "every_seconds", "1 to"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone", "Mars/Olympus"),
        ({}, "cron", "exactly one"),
        ({"cron": "* * * * *", "every_seconds": 5}, "cron", "exactly one"),
    ],
)
def test_a_rule_that_cannot_be_used_is_refused_naming_its_field(rule, field, says):
    with pytest.raises(ScheduleRefused, match=says) as refused:
        Rule(**rule)
    assert refused.value.field == field


def test_intervals_fall_on_multiples_of_the_interval_since_the_epoch():
    rule = Rule(every_seconds=30)
    assert rule.next_after(T0 + timedelta(seconds=1)) == T0 + timedelta(seconds=30)
    assert rule.next_after(T0 + timedelta(seconds=30)) == T0 + timedelta(seconds=60)  # strictly after
    assert rule.upcoming(T0, 3) == [T0 + timedelta(seconds=s) for s in (30, 60, 90)]


def test_cron_with_seconds_reads_them_first():
    rule = Rule(cron="*/20 * * * * *")
    assert rule.upcoming(T0, 3) == [T0 + timedelta(seconds=s) for s in (20, 40, 60)]


def test_cron_runs_in_its_timezone():
    rule = Rule(cron="0 2 * * *", timezone="Europe/Paris")  # 02:00 in Paris is 01:00 UTC in winter
    assert rule.next_after(T0) == datetime(2026, 1, 1, 1, tzinfo=UTC)
    first_monday = Rule(cron="0 9 * * 1#1")
    assert first_monday.next_after(T0) == datetime(2026, 1, 5, 9, tzinfo=UTC)
    assert first_monday.next_after(datetime(2026, 1, 6, tzinfo=UTC)) == datetime(2026, 2, 2, 9, tzinfo=UTC)


def test_a_time_daylight_saving_skips_runs_after_the_gap_and_says_so():
    rule = Rule(cron="30 2 * * *", timezone="America/New_York")  # clocks go 02:00 -> 03:00 on 2026-03-08
    before, on_the_day, after = rule.upcoming(datetime(2026, 3, 7, 12, tzinfo=UTC), 3)
    assert before == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)  # 03:00 EDT: the first moment after the gap
    assert (
        rule.note(before) is not None
        and "03:00:00" in rule.note(before)
        and "2026-03-08" in rule.note(before)
    )
    assert on_the_day == datetime(2026, 3, 9, 6, 30, tzinfo=UTC)  # 02:30 EDT again
    assert rule.note(on_the_day) is None and rule.note(after) is None


def test_a_repeated_time_runs_once_for_a_fixed_hour_and_twice_for_an_hourly_rule():
    daily = Rule(cron="30 1 * * *", timezone="America/New_York")  # 01:30 happens twice on 2026-11-01
    assert daily.upcoming(datetime(2026, 10, 31, 12, tzinfo=UTC), 2) == [
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC),  # 01:30 EDT
        datetime(2026, 11, 2, 6, 30, tzinfo=UTC),  # the next day: 01:30 EST; not 01:30 EST on the 1st
    ]
    hourly = Rule(cron="0 * * * *", timezone="America/New_York")
    times = hourly.upcoming(datetime(2026, 11, 1, 4, 30, tzinfo=UTC), 3)
    assert times == [
        datetime(2026, 11, 1, h, tzinfo=UTC) for h in (5, 6, 7)
    ]  # 01:00 EDT, 01:00 EST, 02:00 EST


def test_missed_policies():
    rule, due, now = Rule(every_seconds=1), T0, T0 + timedelta(seconds=10.5)  # 11 times due, 0..10
    skip = plan_round(rule, Policy("skip", 3, grace_seconds=1), due, now)
    assert skip.fire == [(T0 + timedelta(seconds=10), "on_time")]
    assert (skip.missed, skip.missed_from, skip.missed_until) == (10, T0, T0 + timedelta(seconds=9))
    once = plan_round(rule, Policy("run_once", 3, grace_seconds=1), due, now)
    assert once.fire == [(T0 + timedelta(seconds=9), "catch_up"), (T0 + timedelta(seconds=10), "on_time")]
    assert once.missed == 9
    every = plan_round(rule, Policy("run_all", 3, grace_seconds=1), due, now)
    assert [t.second for t, _ in every.fire] == [7, 8, 9, 10] and every.missed == 7
    assert every.next_fire_at == T0 + timedelta(seconds=11)
    exact = plan_round(rule, Policy("skip", 3, grace_seconds=1), due, T0 + timedelta(seconds=30))
    assert [t.second for t, _ in exact.fire] == [29, 30] and exact.missed == 29  # 29 is late by exactly 1 s


def test_the_default_grace_is_a_minute_or_the_gap_to_the_next_fire():
    second, due = Rule(every_seconds=1), T0
    plan = plan_round(second, Policy("skip"), due, T0 + timedelta(seconds=10))
    assert [t.second for t, _ in plan.fire] == [9, 10] and plan.missed == 9
    generous = plan_round(second, Policy("skip", grace_seconds=60), due, T0 + timedelta(seconds=10))
    assert len(generous.fire) == 11 and generous.missed == 0  # a 10 s outage within a 60 s grace


def test_a_fire_late_by_more_than_its_grace_is_missed():
    rule = Rule(cron="0 2 * * *")
    plan = plan_round(rule, Policy("skip"), T0 + timedelta(hours=2), T0 + timedelta(hours=2, seconds=61))
    assert plan.fire == [] and plan.missed == 1
    plan = plan_round(rule, Policy("skip"), T0 + timedelta(hours=2), T0 + timedelta(hours=2, seconds=59))
    assert plan.fire == [(T0 + timedelta(hours=2), "on_time")] and plan.missed == 0


def test_a_long_outage_is_counted_as_a_lower_bound_and_still_catches_up():
    plan = plan_round(
        Rule(every_seconds=1), Policy("run_all", 2, grace_seconds=1), T0, T0 + timedelta(days=2)
    )
    assert not plan.counted_all and plan.missed >= 1_000
    assert [k for _, k in plan.fire] == ["catch_up", "catch_up", "on_time", "on_time"]  # late by 1 s and 0 s
    assert plan.fire[-1][0] == T0 + timedelta(days=2) and plan.next_fire_at == T0 + timedelta(
        days=2, seconds=1
    )


# --- fires on the database --------------------------------------------------------------------


def make(conn, name="s", *, rule=None, task=None, due_ago: float | None = 0.0, **kw) -> dict:
    """A schedule; with due_ago, its next fire moved to that many seconds ago (due now)."""
    row = schedule_create(conn, name=name, rule=rule or Rule(cron="0 0 1 1 *"), task=task or NOOP, **kw)
    if due_ago is not None:
        conn.execute(
            "UPDATE task_schedules SET next_fire_at = date_trunc('second', now()) - make_interval(secs => %s) WHERE id = %s",
            (due_ago, row["id"]),
        )
    return schedule_get(conn, row["id"])


def tasks_of(conn, schedule_id) -> list[dict]:
    return conn.execute(
        "SELECT id, owner_key_id, scheduled_for, status::text AS status, task_type, unique_key FROM tasks"
        " WHERE schedule_id = %s ORDER BY scheduled_for",
        (schedule_id,),
    ).fetchall()


def test_a_due_schedule_fires_one_task_and_moves_on(conn):
    s = make(conn, task={**NOOP, "queue": "nightly", "priority": 5})
    due_at = s["next_fire_at"]
    fires = schedules_fire_due(conn, by="w1")
    assert [(f.outcome, f.kind, f.scheduled_for) for f in fires] == [("created", "on_time", due_at)]
    (task,) = tasks_of(conn, s["id"])
    assert task["scheduled_for"] == due_at and task["id"] == fires[0].task_id
    row = conn.execute(
        "SELECT queue, priority, status::text AS status FROM tasks WHERE id = %s", (task["id"],)
    ).fetchone()
    assert row == {"queue": "nightly", "priority": 5, "status": "pending"}
    after = schedule_get(conn, s["id"])
    assert after["next_fire_at"] == datetime(after["next_fire_at"].year, 1, 1, tzinfo=UTC) > due_at
    assert schedules_fire_due(conn, by="w2") == []  # nothing due any more
    (fire,) = schedule_fires(conn, s["id"])
    assert (fire["outcome"], fire["task_id"], fire["fired_by"]) == ("created", task["id"], "w1")


def test_many_hosts_firing_at_once_make_exactly_one_task_per_fire_time(database_url, conn):
    # 30 schedules, each with 5 fire times due (run_all), fired by 6 connections at once, again and again.
    for n in range(30):
        make(conn, f"s{n}", rule=Rule(every_seconds=1), due_ago=4, missed="run_all", grace_seconds=1)
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def host(i: int) -> None:
        try:
            with connect(database_url, role="test") as c:
                barrier.wait()
                for _ in range(5):
                    schedules_fire_due(c, by=f"host{i}", limit=7)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=host, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    per_time = Counter(
        (r["schedule_id"], r["scheduled_for"])
        for r in conn.execute("SELECT schedule_id, scheduled_for FROM tasks WHERE schedule_id IS NOT NULL")
    )
    assert per_time and max(per_time.values()) == 1
    fires = conn.execute(
        "SELECT count(*) AS n FROM task_schedule_fires WHERE outcome = 'created'"
    ).fetchone()["n"]
    assert fires == sum(per_time.values()) >= 30 * 5
    # each schedule's tasks are its fire times one second apart, none left out between them
    by_schedule: dict[int, list[datetime]] = {}
    for sid, at in sorted(per_time):
        by_schedule.setdefault(sid, []).append(at)
    assert len(by_schedule) == 30
    for times in by_schedule.values():
        assert len(times) >= 5
        assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(times))


def test_overlap_skip_creates_nothing_while_the_last_run_is_unfinished(conn):
    s = make(conn, overlap="skip", rule=Rule(every_seconds=3600))
    (first,) = schedules_fire_due(conn, by="w")
    assert first.outcome == "created"
    conn.execute(
        "UPDATE task_schedules SET next_fire_at = now() - interval '1 second' WHERE id = %s", (s["id"],)
    )
    (second,) = schedules_fire_due(conn, by="w")
    assert (second.outcome, second.task_id) == ("skipped", first.task_id)
    assert f"task {first.task_id}" in second.reason and "pending" in second.reason
    assert len(tasks_of(conn, s["id"])) == 1
    conn.execute("UPDATE tasks SET status = 'completed', finished_at = now() WHERE id = %s", (first.task_id,))
    conn.execute(
        "UPDATE task_schedules SET next_fire_at = now() - interval '0.5 second' WHERE id = %s", (s["id"],)
    )
    (third,) = schedules_fire_due(conn, by="w")
    assert third.outcome == "created" and len(tasks_of(conn, s["id"])) == 2


def test_a_schedule_of_a_key_makes_its_tasks_and_its_quota_refuses_with_a_reason(conn):
    owner = add_key(conn, max_unfinished=1)
    s = make(conn, owner_key_id=owner, rule=Rule(every_seconds=3600))
    (fire,) = schedules_fire_due(conn, by="w")
    assert fire.outcome == "created"
    (task,) = tasks_of(conn, s["id"])
    assert task["owner_key_id"] == owner
    conn.execute(
        "UPDATE task_schedules SET next_fire_at = now() - interval '1 second' WHERE id = %s", (s["id"],)
    )
    (refused,) = schedules_fire_due(conn, by="w")
    assert refused.outcome == "refused" and "max_unfinished is 1" in refused.reason
    assert len(tasks_of(conn, s["id"])) == 1
    recorded = {f["scheduled_for"]: f for f in schedule_fires(conn, s["id"])}[refused.scheduled_for]
    assert (recorded["outcome"], recorded["reason"]) == ("refused", refused.reason)  # recorded, not lost


def test_a_revoked_owner_makes_nothing_and_says_so(conn):
    owner = add_key(conn)
    s = make(conn, owner_key_id=owner)
    conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = %s", (owner,))
    (fire,) = schedules_fire_due(conn, by="w")
    assert fire.outcome == "refused" and "revoked" in fire.reason and tasks_of(conn, s["id"]) == []


def test_a_unique_key_deduplicates_a_fire_onto_the_unfinished_task(conn):
    held = insert_task(conn, unique_key="nightly")
    s = make(conn, task={**NOOP, "unique_key": "nightly"})
    (fire,) = schedules_fire_due(conn, by="w")
    assert (fire.outcome, fire.task_id) == ("deduplicated", held)
    assert tasks_of(conn, s["id"]) == []


def test_what_the_database_refuses_is_recorded_and_the_schedule_moves_on(conn):
    s = make(conn, task={**NOOP, "queue": "no spaces allowed"})  # a DBA's hand edit past the API's checks
    (fire,) = schedules_fire_due(conn, by="w")
    assert fire.outcome == "refused" and "database refused" in fire.reason
    assert schedule_fires(conn, s["id"])[0]["outcome"] == "refused"
    assert schedule_get(conn, s["id"])["next_fire_at"] > s["next_fire_at"]


def test_missed_fire_times_are_recorded_and_caught_up_by_policy(conn):
    skip = make(conn, "skip", rule=Rule(every_seconds=1), due_ago=10, missed="skip", grace_seconds=1)
    once = make(conn, "once", rule=Rule(every_seconds=1), due_ago=10, missed="run_once", grace_seconds=1)
    schedules_fire_due(conn, by="w")
    skipped = [f for f in schedule_fires(conn, skip["id"]) if f["outcome"] == "missed"]
    assert (
        len(skipped) == 1
        and skipped[0]["missed_count"] >= 9
        and skipped[0]["scheduled_for"] == skip["next_fire_at"]
    )
    assert len(tasks_of(conn, skip["id"])) <= 1  # only an on-time fire, if the round was quick enough
    kinds = Counter(f["kind"] for f in schedule_fires(conn, once["id"]) if f["outcome"] == "created")
    assert kinds["catch_up"] == 1


def test_a_paused_schedule_does_not_fire_and_resumes_from_the_next_time(conn):
    s = make(conn, rule=Rule(every_seconds=1), due_ago=5)
    schedule_set_paused(conn, s["id"], paused=True, by="test")
    assert schedules_fire_due(conn, by="w") == []
    resumed = schedule_set_paused(conn, s["id"], paused=False, by="test")
    assert resumed["next_fire_at"] > conn.execute("SELECT now() AS n").fetchone()["n"] - timedelta(seconds=1)
    assert not [f for f in schedule_fires(conn, s["id"]) if f["outcome"] == "missed"]


def test_run_now_fires_at_once_and_leaves_the_next_fire(conn):
    s = make(conn, due_ago=None)
    fire = schedule_run_now(conn, s["id"], by="skl_test")
    assert (fire.outcome, fire.kind) == ("created", "manual")
    assert tasks_of(conn, s["id"])[0]["id"] == fire.task_id
    assert schedule_get(conn, s["id"])["next_fire_at"] == s["next_fire_at"]
    with pytest.raises(ScheduleNotFound):
        schedule_run_now(conn, s["id"] + 1000, by="x")


def test_a_client_sees_and_changes_only_its_own_schedules(conn):
    alice, bob = add_key(conn, name="alice"), add_key(conn, name="bob")
    mine = make(conn, "mine", owner_key_id=alice, due_ago=None)
    make(conn, "mine", owner_key_id=bob, due_ago=None)  # the same name, another owner
    with pytest.raises(ScheduleNameTaken):
        make(conn, "mine", owner_key_id=alice, due_ago=None)
    assert [s["name"] for s in schedule_list(conn, owner=alice)] == ["mine"]
    assert len(schedule_list(conn)) == 2  # an admin
    for act in (
        lambda: schedule_get(conn, mine["id"], owner=bob),
        lambda: schedule_set_paused(conn, mine["id"], paused=True, owner=bob),
        lambda: schedule_update(conn, mine["id"], {"missed": "run_all"}, owner=bob),
        lambda: schedule_run_now(conn, mine["id"], owner=bob, by="bob"),
        lambda: schedule_delete(conn, mine["id"], owner=bob),
    ):
        with pytest.raises(ScheduleNotFound):
            act()
    assert schedule_get(conn, mine["id"]) == mine  # untouched


def test_a_new_rule_fires_from_its_first_time_after_now(conn):
    s = make(conn, due_ago=None)
    changed = schedule_update(conn, s["id"], {"every_seconds": 7}, by="test")
    assert changed["cron"] is None and changed["every_seconds"] == 7
    assert changed["next_fire_at"] < s["next_fire_at"] and changed["next_fire_at"].timestamp() % 7 == 0
    same = schedule_update(conn, s["id"], {"overlap": "skip"}, by="test")
    assert same["next_fire_at"] == changed["next_fire_at"] and same["overlap"] == "skip"
    with pytest.raises(ScheduleRefused):
        schedule_update(conn, s["id"], {"timezone": "Nowhere/Land"}, by="test")


def test_the_view_shows_next_runs_with_their_daylight_saving_notes_and_last_fires(conn):
    s = make(conn, rule=Rule(cron="30 2 * * *", timezone="America/New_York"), due_ago=None)
    conn.execute("UPDATE task_schedules SET next_fire_at = '2027-03-12 07:30+00' WHERE id = %s", (s["id"],))
    view = schedule_view(conn, schedule_get(conn, s["id"]))
    notes = [r["note"] for r in view["next_runs"]]
    assert len(view["next_runs"]) == 5 and notes[0] is None and notes[2] is not None  # 2027-03-14 skips 02:30
    assert view["last_fires"] == [] and view["declared_in_code"] is False


def test_schedules_declared_in_code_are_written_once_and_keep_their_next_fire(conn):
    declared = DeclaredSchedule(
        name="cleanup",
        task_type="noop",
        every_seconds=60,
        defaults=(("max_attempts", 3), ("timeout_seconds", 30)),
    )
    assert schedules_sync_declared(conn, [declared], by="w1") == 1
    (row,) = schedule_list(conn)
    assert (row["source"], row["owner_key_id"], row["task"]["max_attempts"]) == ("code", None, 3)
    schedule_set_paused(conn, row["id"], paused=True, by="admin")
    schedules_sync_declared(conn, [declared], by="w2")  # another worker starts: nothing changes
    again = schedule_get(conn, row["id"])
    assert again["next_fire_at"] == row["next_fire_at"] and again["paused"] and again["updated_by"] == "admin"
    moved = DeclaredSchedule(name="cleanup", task_type="noop", every_seconds=3600, defaults=declared.defaults)
    schedules_sync_declared(conn, [moved], by="w3")
    assert schedule_get(conn, row["id"])["every_seconds"] == 3600
    with pytest.raises(ScheduleDeclaredInCode):
        schedule_update(conn, row["id"], {"every_seconds": 5})
    assert len(schedule_list(conn)) == 1


def test_next_due_in_and_retention(conn):
    assert schedules_next_due_in(conn) is None
    # Every minute, not every second: a loaded machine can take a second between the fire and
    # the look (the next fire was already due: CI saw -0.005 s).
    s = make(conn, rule=Rule(every_seconds=60), due_ago=0)
    assert schedules_next_due_in(conn) <= 0
    schedules_fire_due(conn, by="w")
    assert 0 < schedules_next_due_in(conn) <= 60.0
    conn.execute("UPDATE task_schedule_fires SET fired_at = now() - interval '2 hours'")
    assert schedule_fires_prune(conn, older_than_seconds=3600, limit=100) >= 1
    assert schedule_fires(conn, s["id"]) == []
