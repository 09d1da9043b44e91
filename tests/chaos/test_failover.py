"""Failover: a primary and a streaming standby of the test's own, clients submitting through
gunicorn and a worker running, all on one multi-host DATABASE_URL (target_session_attrs=
read-write), as behind Patroni or RDS. The standby falls behind (asynchronous replication, cut
off), the primary is SIGKILLed and the standby promoted.

What asynchronous replication loses, it loses: the tasks acknowledged after the standby's last
WAL. What must hold whatever the mode: no id names two tasks (a client polling a lost task's id
is told it is gone, never shown a newer task), and a task whose outcome was lost with the WAL
runs again as soon as its worker reaches the new primary, not a lease later."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import pytest

from skiplock.db import apply_schema, connect
from tests.chaos.faults import REPORTS, Cluster, Report, SubmitLog, SubmitLoop, submit_many
from tests.chaos.servers import PrivatePostgres, Standby, multi_host_url
from tests.helpers import Http, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

# Long enough that "a lease later" cannot pass for "at once".
LEASE_SECONDS = 20.0
# The task running across the cut: long enough to outlast the standby's stop on a loaded machine.
SLEEP_SECONDS = 4.0


@dataclass
class Failover:
    """A primary, its standby, and gunicorn and a worker.py on one multi-host URL of both."""

    primary: PrivatePostgres
    standby: Standby
    cluster: Cluster
    http: Http


@pytest.fixture
def failover(settings):
    """failover(synchronous=False) -> a Failover running, the schema applied; all stopped after,
    whatever fails on the way."""
    servers: list[PrivatePostgres | Standby] = []
    clusters: list[Cluster] = []

    def start(synchronous: bool = False) -> Failover:
        primary = PrivatePostgres()
        servers.append(primary)
        apply_schema(primary.url)
        standby = Standby(primary, synchronous=synchronous)
        servers.append(standby)
        cluster = Cluster(
            replace(settings, database_url=multi_host_url(primary, standby), lease_seconds=LEASE_SECONDS),
            connect(primary.url, role="test", guarded=False),
        )
        clusters.append(cluster)
        http = cluster.start_api()
        cluster.start_worker("--concurrency", "2")
        return Failover(primary, standby, cluster, http)

    yield start
    for cluster in clusters:
        cluster.close()
        if not cluster.conn.closed:
            cluster.conn.close()
    for server in reversed(servers):  # the standby first: its folder is inside the primary's
        server.close()


def tasks_of(url: str, ids: list[int]) -> dict[int, dict]:
    with connect(url, role="test", guarded=False) as conn:
        rows = conn.execute(
            "SELECT id, status, task_type, input FROM tasks WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    return {r["id"]: r for r in rows}


def wait_all_completed(url: str, ids: list[int], what: str, timeout: float = 20.0) -> None:
    wait_until(
        lambda: [t["status"] for t in tasks_of(url, ids).values()] == ["completed"] * len(ids),
        timeout=timeout,
        message=f"{what} to complete",
    )


def passed(report: Report) -> None:
    """Into the chaos table (`make chaos` prints it), once the test's assertions held."""
    report.verdict = "PASS"
    REPORTS.append(report)
    print(report.notes)


@pytest.mark.pg_agnostic
def test_an_async_failover_reuses_no_id_and_reruns_lost_outcomes_at_once(failover):
    system = failover()
    primary, standby, cluster, http = system.primary, system.standby, system.cluster, system.http
    report = Report("failover: async standby cut off, primary SIGKILLed, standby promoted")

    # Before: work the standby receives. A task running when the standby is cut off: its start
    # reaches the standby, its end does not.
    before = submit_many(http, [{"task_type": "noop", "task_input": {"i": i}} for i in range(20)])
    code, _, running = http.request(
        "POST", "/api/submit-task", {"task_type": "sleep", "task_input": {"seconds": SLEEP_SECONDS}}
    )
    assert code == 202, running
    running_id = running["task_id"]
    wait_until(
        lambda: cluster.conn.execute("SELECT started_at FROM tasks WHERE id = %s", (running_id,)).fetchone()[
            "started_at"
        ],
        message="the sleep task to start",
    )
    lsn = primary.current_lsn()
    wait_until(lambda: standby.replayed(lsn), message="the standby to catch up")
    standby.stop()
    # The premise: it ends after the cut, so its end is what the standby never receives.
    assert tasks_of(primary.url, [running_id])[running_id]["status"] == "processing"

    # Acknowledged by the primary alone: lost with it.
    lost_candidates = submit_many(
        http, [{"task_type": "noop", "task_input": {"lost": i}} for i in range(60)]
    ).acknowledged
    wait_all_completed(primary.url, [running_id], "the sleep task, on the primary,")
    primary.kill_9()
    cluster.conn.close()
    killed_at = time.monotonic()
    standby.start()
    standby.promote()
    promoted_at = time.monotonic()
    cluster.conn = connect(standby.url, role="test", guarded=False)
    started_db = cluster.conn.execute("SELECT pg_postmaster_start_time() AS t").fetchone()["t"]

    # After: clients submit again (503 with Retry-After while no server accepts writes).
    new = SubmitLog()
    wait_until(
        lambda: submit_many(http, [{"task_type": "noop", "task_input": {"new": 0}}], new).codes.get(202),
        timeout=30,
        interval=0.2,
        message="the API to accept submits on the new primary",
    )
    submit_many(http, [{"task_type": "noop", "task_input": {"new": i}} for i in range(1, 60)], new)
    back_at = time.monotonic()

    survived = tasks_of(standby.url, before.acknowledged + lost_candidates + new.acknowledged)
    lost = [i for i in lost_candidates if i not in survived]
    reused = [i for i in new.acknowledged if i in set(before.acknowledged + lost_candidates)]
    report.tasks = len(before.acknowledged) + len(lost_candidates) + len(new.acknowledged) + 1
    report.faults, report.lost = 1, len(lost)
    report.notes = (
        f"{len(lost)} of {len(lost_candidates)} acknowledged after the standby's last WAL lost "
        f"(async), {len(reused)} ids reused; writes back {back_at - killed_at:.1f} s after the "
        f"kill ({back_at - promoted_at:.1f} s after promotion)"
    )
    assert not reused, reused
    assert lost, "the standby was cut off: the tasks acknowledged after that must be lost"
    assert min(new.acknowledged) > max(before.acknowledged + lost_candidates)
    assert all(task_id in survived for task_id in before.acknowledged)  # replicated before the cut
    assert set(new.codes) <= {202, 503} and new.errors == 0, (new.codes, new.errors)

    # A lost task's id names nothing now: polled, it is gone (410), not a newer task.
    code, _, answer = http.request("GET", f"/api/task-status/{lost[0]}")
    assert code == 410, (code, answer)

    # The task whose completion was lost was taken back at once, not a lease (20 s) later
    # (database clock: from the standby's start, promotion included, to its lost attempt).
    wait_all_completed(
        standby.url,
        [running_id],
        "the sleep task, again on the new primary,",
        LEASE_SECONDS + SLEEP_SECONDS + 10,
    )
    attempts = cluster.conn.execute(
        "SELECT outcome, finished_at FROM task_attempts WHERE task_id = %s ORDER BY attempt", (running_id,)
    ).fetchall()
    assert [a["outcome"] for a in attempts] == ["lost", "completed"], attempts
    taken_back = (attempts[0]["finished_at"] - started_db).total_seconds()
    assert taken_back < LEASE_SECONDS / 2, taken_back
    wait_all_completed(standby.url, new.acknowledged, "the new tasks")
    report.notes += (
        f"; the task whose outcome was lost was taken back {taken_back:.1f} s after the standby"
        " started (promotion included)"
    )
    passed(report)  # lost: what asynchronous replication loses (judged above, not zero)


@pytest.mark.pg_agnostic
def test_a_sync_failover_under_load_loses_nothing_acknowledged(failover):
    """A synchronous standby: the primary SIGKILLed while clients submit about 100 tasks/s,
    the standby promoted. Every task acknowledged before, during and after is there and runs."""
    system = failover(synchronous=True)
    primary, standby, cluster, http = system.primary, system.standby, system.cluster, system.http
    report = Report("failover: sync standby, primary SIGKILLed under load, standby promoted")
    with SubmitLoop(http, {"task_type": "noop", "task_input": {}}, threads=2, pause=0.02) as load:
        wait_until(lambda: len(load.log.acknowledged) >= 100, message="100 tasks acknowledged")
        primary.kill_9()
        cluster.conn.close()
        killed_at = time.monotonic()
        standby.promote()
        before_back = len(load.log.acknowledged)
        wait_until(
            lambda: len(load.log.acknowledged) >= before_back + 100,
            timeout=30,
            message="100 more tasks acknowledged by the new primary",
        )
        back_after = time.monotonic() - killed_at
    cluster.conn = connect(standby.url, role="test", guarded=False)
    log = load.log
    acknowledged = log.acknowledged
    assert len(set(acknowledged)) == len(acknowledged)  # no id acknowledged twice
    assert set(log.codes) <= {202, 503} and log.errors == 0, (log.codes, log.errors)
    present = tasks_of(standby.url, acknowledged)
    report.tasks, report.faults = len(acknowledged), 1
    report.lost = len(acknowledged) - len(present)
    assert report.lost == 0, sorted(set(acknowledged) - set(present))
    wait_all_completed(standby.url, acknowledged, "every acknowledged task", timeout=30)
    report.notes = (
        f"answers {dict(sorted(log.codes.items()))}, slowest {log.max_latency:.2f} s; "
        f"100 more acknowledged {back_after:.1f} s after the kill"
    )
    passed(report)
