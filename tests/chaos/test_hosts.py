"""Many hosts against one Postgres: two API hosts and three worker hosts, each in a network
namespace with an address of its own on one bridge (tests/chaos/hosts.py), as machines on one
switch. haproxy balances the API hosts; PgBouncer stands in front of Postgres, the API's pool in
transaction mode and the workers in session mode (their liveness lock and LISTEN need a session
of their own); the API's LISTEN goes straight to Postgres, as the README's production section
says. All traffic stays on this machine.

Clients submit steadily through haproxy, each submit under an Idempotency-Key of its own, and
retry (same key, same body) after a timeout, a lost connection or a 5xx until answered. Then:
(a) a worker host's cable is pulled, its processes left running: its tasks run elsewhere once
    their leases lapse, nothing it had not started is charged, and when its cable is back its
    late results are fenced out and it works on;
(b) an API host's cable is pulled: haproxy routes around it, the retries lose nothing and
    duplicate nothing, and it serves again once back;
(c) PgBouncer is SIGKILLed and started again: the API and every worker reconnect.
Each scenario is judged as every fault scenario is (tests/chaos/faults.py: lost, duplicated,
charged without a start, the self-audit, rescue time) and adds its recovery figures."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from skiplock.db import apply_schema, connect
from skiplock.settings import Settings
from tests.chaos.faults import Cluster, Kill, Report, assert_passed, judge, size, tally_body
from tests.chaos.hosts import Haproxy, Host, Network, RetryingClients, require_hosts
from tests.chaos.servers import PrivatePostgres
from tests.conftest import FAST
from tests.helpers import ROOT, Http, settings_env, stop_process, wait_until
from tests.pgbouncer import ROLE_DEFAULTS, Bouncer, require_pgbouncer, set_role_defaults

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

API_PORT = 8000
# Each task runs this long: at the load below every worker host has some running when it is cut.
TASK_SECONDS = 0.2
# Answered submits each scenario sends again under their key (judge_clients).
REPLAYS = 20
# Server connections PgBouncer keeps for the workers (session mode: one per worker connection).
WORKER_SESSIONS = 24
# PgBouncer's keepalives towards its clients: the server session of a worker host that vanished
# (and the liveness lock it holds) is let go in about idle + interval x count seconds.
BOUNCER_KEEPALIVES = {"tcp_keepidle": 2, "tcp_keepintvl": 1, "tcp_keepcnt": 3, "tcp_user_timeout": 5000}
# How long PgBouncer stays down when restarted: a service manager's restart, with time to notice.
POOLER_DOWN_SECONDS = 2.0
# Leases outlast that outage and the reconnect after it, as in production (30 s by default): the
# suite's 2 s would lapse while every worker is cut off, and a lapsed lease is rescued.
LEASE_SECONDS = 6.0


@dataclass
class Site:
    network: Network
    pg: PrivatePostgres
    bouncer: Bouncer
    haproxy: Haproxy
    cluster: Cluster  # the workers (its settings are theirs)
    api_hosts: list[Host]
    worker_hosts: list[Host]
    apis: list  # gunicorn processes, one per API host

    @property
    def conn(self) -> psycopg.Connection:
        return self.cluster.conn

    def healthy(self) -> None:
        """Every host plugged in and serving: where each scenario starts."""
        for host in self.api_hosts + self.worker_hosts:
            self.network.restore(host)
        assert all(proc.poll() is None for proc in self.apis + self.cluster.workers)
        wait_until(
            lambda: set(self.haproxy.states().values()) == {"UP"}, timeout=20, message="every API host up"
        )
        self.cluster.kills = []


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    require_hosts()
    require_pgbouncer()
    with contextlib.ExitStack() as undo:
        # Each part is undone even if another's undoing fails (callbacks run in reverse order).
        network = Network()
        undo.callback(network.close)
        api_hosts = [network.add_host(f"api{n}") for n in (1, 2)]
        worker_hosts = [network.add_host(f"worker{n}") for n in (1, 2, 3)]
        pg = PrivatePostgres()
        undo.callback(pg.close)
        apply_schema(pg.url)
        pg.listen_on(network.gateway, network.cidr)
        conn = connect(pg.url, role="test", guarded=False)
        undo.callback(conn.close)
        set_role_defaults(conn, **ROLE_DEFAULTS)  # the API's bounds behind a transaction pooler
        bouncer = Bouncer(
            pg.url,
            sessions=WORKER_SESSIONS,
            listen_addr=f"{network.gateway},127.0.0.1",
            default_pool_size=4,
            **BOUNCER_KEEPALIVES,
        )
        undo.callback(bouncer.stop)
        base = Settings(database_url=pg.url, **{**FAST, "lease_seconds": LEASE_SECONDS})
        worker_settings = replace(base, database_url=bouncer.session_url, database_pooler="session")
        cluster = Cluster(worker_settings, conn)
        undo.callback(cluster.close)
        for host in worker_hosts:
            cluster.start_worker(prefix=host.run([]))
        direct = make_conninfo(
            pg.url, host=network.gateway, port=conninfo_to_dict(pg.url).get("port") or "5432"
        )
        api_settings = replace(
            base,
            database_url=bouncer.url,
            database_pooler="transaction",
            listen_database_url=direct,
            auth_off_on_public_bind=True,  # bound to the host's own address, as in production
        )
        apis = [start_api_host(host, api_settings, undo) for host in api_hosts]
        haproxy = Haproxy({f"api{n}": f"{host.address}:{API_PORT}" for n, host in enumerate(api_hosts, 1)})
        undo.callback(haproxy.close)
        wait_until(
            lambda: (
                conn.execute("SELECT count(*) AS n FROM task_workers").fetchone()["n"] == len(worker_hosts)
            ),
            timeout=30,
            message="every worker host registered",
        )
        yield Site(network, pg, bouncer, haproxy, cluster, api_hosts, worker_hosts, apis)


def start_api_host(host: Host, settings: Settings, undo: contextlib.ExitStack) -> subprocess.Popen:
    """gunicorn (two gevent processes) on the host's own address, once it answers there."""
    proc = subprocess.Popen(
        host.run(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-w", "2",
             "-b", f"{host.address}:{API_PORT}", "wsgi:app"]
        ),
        cwd=ROOT,
        env=settings_env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    undo.callback(stop_process, proc, 15)
    http = Http(f"http://{host.address}:{API_PORT}", timeout=2)

    def ready() -> bool:
        try:
            return http.request("GET", "/readyz")[0] == 200
        except OSError:
            return False

    wait_until(ready, timeout=30, message=f"the API on {host.name}")
    return proc


def started_held(site: Site, worker_id: str) -> int:
    """Tasks the worker runs now (their tally start seen, not yet stored)."""
    return site.cluster.in_flight(worker_id)


def created_unanswered(conn, since, acknowledged: list[int]) -> int:
    """Tasks created since `since` that no client was answered with: a retry that made a second
    task (every submit was answered in the end, so any such task is a duplicate)."""
    return conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE created_at >= %s AND NOT id = ANY(%s)", (since, acknowledged)
    ).fetchone()["n"]


def judge_scenario(site: Site, clients: RetryingClients, scenario: str) -> Report:
    """One fault, judged as every fault scenario is (tests/chaos/faults.py) on what the clients
    were answered, with the kills the scenario recorded."""
    report = judge(
        Report(scenario),
        site.conn,
        clients.acknowledged(),
        site.cluster.kills,
        site.cluster.settings,
        tally=site.cluster.tally,
        timeout=60,
    )
    report.faults = 1  # (PgBouncer's restart records a kill per worker: one fault all the same)
    return report


def judge_clients(report: Report, site: Site, clients: RetryingClients, since) -> Report:
    """What the clients saw: every submit answered, no task made twice, and a submit sent again
    under its key answered with its task (through whichever API host haproxy picks)."""
    unanswered = clients.unanswered()
    refused = [s.refused for s in clients.snapshot() if s.refused]
    twice = created_unanswered(site.conn, since, clients.acknowledged())
    replayed, conflicting = clients.replay(REPLAYS)
    report.lost += len(unanswered)
    report.duplicated += conflicting + twice
    submits = clients.snapshot()
    add_note(
        report,
        f"{len(submits)} submits, {clients.retried()} retries, "
        f"{sum(s.replayed for s in submits)} answers replayed (Idempotent-Replayed), "
        f"{twice} tasks made twice, {len(refused)} refused; {replayed} of {replayed + conflicting} sent "
        "again answered with their task",
    )
    if unanswered or refused or conflicting or twice:
        report.verdict = "FAIL"
    return report


def add_note(report: Report, note: str) -> None:
    report.notes = "; ".join(filter(None, [report.notes.strip("; "), note]))


def wait_for_load(site: Site, clients: RetryingClients, answered: int) -> None:
    wait_until(
        lambda: clients.answered_count() >= answered, timeout=30, message=f"{answered} submits answered"
    )


# --- (a) a worker host cut off --------------------------------------------------------------------


def test_a_worker_host_cut_off_under_load(site):
    site.healthy()
    cluster, conn = site.cluster, site.conn
    victim_host, victim = site.worker_hosts[2], cluster.workers[2]
    victim_id = cluster.worker_id(victim)
    since = cluster.db_now()
    with RetryingClients(site.haproxy.base, tally_body(TASK_SECONDS)) as clients:
        wait_for_load(site, clients, size(20, 100))
        cut_at, held = cut_while_running(site, victim_host, victim_id)
        kill = Kill(victim_id, cut_at, started_held(site, victim_id))
        time.sleep(1.0)  # a statement it sent before the cut is over by now; its leases last 6 s
        kill.in_hand = cluster.in_hand_now(victim_id)
        cluster.kills.append(kill)
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) AS n FROM tasks WHERE id = ANY(%s) AND status = 'completed'", (held,)
                ).fetchone()["n"]
                == len(held)
            ),
            timeout=30,
            message="the cut host's tasks to run elsewhere",
        )
        rerun = conn.execute(
            "SELECT extract(epoch FROM max(finished_at) - %s) AS s FROM tasks WHERE id = ANY(%s)",
            (cut_at, held),
        ).fetchone()["s"]
        time.sleep(size(1.0, 10.0))  # it stays cut off a while longer, the load going on
        site.network.restore(victim_host)
        restored_at = cluster.db_now()
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) AS n FROM task_attempts WHERE worker_id = %s AND outcome = 'completed' "
                    "AND finished_at > %s",
                    (victim_id, restored_at),
                ).fetchone()["n"]
                > 0
            ),
            timeout=40,
            message="the host, back, to complete tasks again",
        )
        back = (cluster.db_now() - restored_at).total_seconds()
        time.sleep(size(1.0, 10.0))
    report = judge_scenario(
        site, clients, "hosts: a worker host's cable pulled under load (3 worker hosts, PgBouncer, haproxy)"
    )
    # Its runs that ended after the rescue: their results reached the database late, and were
    # refused (the attempt was no longer its own); the re-run's result is the one stored.
    late = {
        (r["task_id"], r["attempt"])
        for r in conn.execute(
            "SELECT task_id, attempt FROM task_attempts WHERE worker_id = %s AND outcome = 'lost' AND task_id = ANY(%s)",
            (victim_id, held),
        ).fetchall()
    }
    lines = cluster.tally.lines()
    ran = {(t, a) for kind, t, a, _ in lines if kind == "S"} & late  # its runs of what it lost
    ended = {(t, a) for kind, t, a, _ in lines if kind == "E"}
    add_note(
        report,
        f"held {len(held)} at the cut, {kill.in_flight} running; all completed elsewhere {float(rerun):.1f} s "
        f"after the cut; {len(ran & ended)} late results fenced out; back at work {back:.1f} s after the "
        "cable returned",
    )
    judge_clients(report, site, clients, since)
    # It ran tasks when cut off, they were taken from it, and those runs ended on it: their
    # results, late, were not stored (each task has one completed attempt, another worker's).
    assert ran and ran <= ended, report
    assert all(o == "completed" for o in task_outcomes_elsewhere(conn, held, victim_id)), report
    assert_passed(report)


def cut_while_running(site: Site, host: Host, worker_id: str) -> tuple:
    """Pull the host's cable while its worker runs tasks: (when, database clock; the ids of the
    tasks it held then). A task may end between the look and the cut: then the cable goes back
    and it is tried again."""
    for _ in range(10):
        wait_until(lambda: started_held(site, worker_id) > 0, timeout=20, message="the victim running tasks")
        site.network.cut(host)
        cut_at = site.cluster.db_now()
        if started_held(site, worker_id) > 0:
            held = site.conn.execute(
                "SELECT id FROM tasks WHERE status = 'processing' AND worker_id = %s", (worker_id,)
            ).fetchall()
            return cut_at, [r["id"] for r in held]
        site.network.restore(host)
    raise AssertionError("the victim never held a task at the moment of the cut")


def task_outcomes_elsewhere(conn, ids: list[int], worker_id: str) -> list[str]:
    """How each task's attempt by another worker than `worker_id` ended (its last such)."""
    rows = conn.execute(
        """
        SELECT DISTINCT ON (task_id) outcome::text AS outcome FROM task_attempts
        WHERE task_id = ANY(%s) AND worker_id <> %s ORDER BY task_id, id DESC
        """,
        (ids, worker_id),
    ).fetchall()
    assert len(rows) == len(ids)
    return [r["outcome"] for r in rows]


# --- (b) an API host cut off ----------------------------------------------------------------------


def test_an_api_host_cut_off_while_clients_retry(site):
    site.healthy()
    cluster = site.cluster
    since = cluster.db_now()
    # Many clients with no pause between submits, so that the host has requests in hand when its
    # cable goes: their answers are lost, and the clients must retry them.
    with RetryingClients(site.haproxy.base, tally_body(0.0), threads=8, pause=0.0) as clients:
        wait_for_load(site, clients, size(50, 500))
        wait_until(lambda: site.haproxy.in_flight("api1") > 0, interval=0.001, message="api1 serving")
        site.network.cut(site.api_hosts[0])
        cut = time.monotonic()
        wait_until(
            lambda: site.haproxy.states()["api1"] == "DOWN", timeout=10, message="haproxy to see api1 down"
        )
        marked_down = time.monotonic() - cut
        answered = clients.answered_count()
        wait_for_load(site, clients, answered + size(20, 100))  # served by api2 alone
        time.sleep(size(1.0, 10.0))
        site.network.restore(site.api_hosts[0])
        restored = time.monotonic()
        wait_until(lambda: site.haproxy.states()["api1"] == "UP", timeout=20, message="api1 up again")
        marked_up = time.monotonic() - restored
        answered = clients.answered_count()
        wait_for_load(site, clients, answered + size(20, 100))
    longest = clients.longest_wait(cut)
    open_at_cut = clients.open_at(cut)
    report = judge_scenario(
        site, clients, "hosts: an API host's cable pulled (2 API hosts behind haproxy), clients retrying"
    )
    add_note(
        report,
        f"haproxy marked it down {marked_down:.1f} s after the cut and up {marked_up:.1f} s after its "
        f"return; {len(open_at_cut)} submits open at the cut, {sum(s.tries > 1 for s in open_at_cut)} "
        f"of them retried; the longest submit (tries included) took {longest:.1f} s",
    )
    judge_clients(report, site, clients, since)
    assert_passed(report)


# --- (c) PgBouncer restarted ------------------------------------------------------------------------


def test_pgbouncer_restarted_under_load(site):
    site.healthy()
    cluster, conn = site.cluster, site.conn
    worker_ids = [cluster.worker_id(proc) for proc in cluster.workers]
    since = cluster.db_now()
    with RetryingClients(site.haproxy.base, tally_body(TASK_SECONDS)) as clients:
        wait_for_load(site, clients, size(20, 100))
        running = {w: started_held(site, w) for w in worker_ids}
        killed_at = cluster.db_now()
        killed = time.monotonic()
        site.bouncer.kill()
        wait_until(  # every session it served has ended (none opens while it is down)
            lambda: (
                conn.execute(
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name LIKE 'skiplock-%%' AND application_name <> 'skiplock-api-listener'"
                    " AND pid <> pg_backend_pid()"
                ).fetchone()["n"]
                == 0
            ),
            message="the pooler's server sessions to end",
        )
        in_hand = {w: cluster.in_hand_now(w) for w in worker_ids}
        time.sleep(max(0.0, POOLER_DOWN_SECONDS - (time.monotonic() - killed)))
        site.bouncer.start()
        down = time.monotonic() - killed
        # No worker can take another's tasks while none reaches the database: a rescue is due
        # within a rescue interval of the pooler's return, not of the fault.
        back_at = cluster.db_now()
        for worker_id in worker_ids:
            cluster.kills.append(
                Kill(worker_id, back_at, running[worker_id], True, in_hand=in_hand[worker_id])
            )
        wait_until(
            lambda: (
                clients.snapshot() and any((s.answered_at or 0) > killed + down for s in clients.snapshot())
            ),
            timeout=30,
            message="a submit answered after the restart",
        )
        api_back = (
            min(s.answered_at for s in clients.snapshot() if (s.answered_at or 0) > killed + down) - killed
        )
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(DISTINCT worker_id) AS n FROM task_attempts WHERE outcome = 'completed'"
                    " AND finished_at > %s AND started_at > %s AND worker_id = ANY(%s)",
                    (killed_at, killed_at, worker_ids),
                ).fetchone()["n"]
                == len(worker_ids)
            ),
            timeout=40,
            message="every worker host to complete a task started after the restart",
        )
        workers_back = time.monotonic() - killed
        time.sleep(size(1.0, 10.0))
    longest = clients.longest_wait(killed)
    report = judge_scenario(
        site, clients, "hosts: PgBouncer SIGKILLed and restarted under load (API and workers through it)"
    )
    add_note(
        report,
        f"down {down:.1f} s; the API answered again {api_back:.1f} s after the kill, every worker host "
        f"completed new work {workers_back:.1f} s after it; the longest submit took {longest:.1f} s",
    )
    judge_clients(report, site, clients, since)
    assert all(proc.poll() is None for proc in cluster.workers + site.apis)
    assert_passed(report)
