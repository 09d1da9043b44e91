"""The dashboard's dead-rows figures: red only when autovacuum is behind on many dead rows, not for
a share of a tiny table. Dead rows are made with real DELETEs in the test's own database, with
autovacuum off on its tasks table (else it could clean them before the page reads them), and read
from the statistics as the dashboard reads them, through the Flask client."""

from __future__ import annotations

import html
import re
from datetime import UTC, datetime

import pytest

from api.dashboard.pages import DEAD_ROWS_BAD, vacuum_figures
from tests.helpers import insert_many, wait_until

FIGURE = re.compile(r'<div class="figure( bad)?">\s*<dt>Dead rows in tasks</dt>\s*<dd>(.*?)</dd>', re.S)


@pytest.fixture
def no_autovacuum(conn):
    conn.execute("ALTER TABLE tasks SET (autovacuum_enabled = false)")


def dead_rows_figure(client) -> tuple[bool, str]:
    """(shown red, its text) of the tasks table's dead rows on the overview's live region."""
    found = FIGURE.search(client.get("/dashboard/live").get_data(as_text=True))
    assert found, "no dead rows figure for tasks"
    return bool(found[1]), html.unescape(re.sub(r"<[^>]+>", "", found[2]))


def stats_show(conn, dead: int) -> bool:
    row = conn.execute("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'tasks'").fetchone()
    return row["n_dead_tup"] >= dead


def test_a_tiny_table_with_most_of_its_rows_dead_is_no_alarm(client, conn, no_autovacuum):
    ids = insert_many(conn, 83)
    conn.execute("DELETE FROM tasks WHERE id = ANY(%s)", (ids[:53],))  # 30 live rows, 53 dead: 64 %
    wait_until(lambda: stats_show(conn, 53), message="the statistics to count the dead rows")
    red, text = dead_rows_figure(client)
    assert text == "53 (63.9 %)" and not red


def test_many_dead_rows_autovacuum_left_are_an_alarm(client, conn, no_autovacuum):
    insert_many(conn, DEAD_ROWS_BAD + 1000)
    conn.execute("DELETE FROM tasks")
    wait_until(lambda: stats_show(conn, DEAD_ROWS_BAD), message="the statistics to count the dead rows")
    red, text = dead_rows_figure(client)
    assert red and text.endswith(f"{DEAD_ROWS_BAD + 1000:,} (100.0 %)"), text
    assert "autovacuum is behind" in client.get("/dashboard/live").get_data(as_text=True)


VACUUMED = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("live", "dead", "bad"),
    [
        (30, 53, False),  # the tiny table: below autovacuum's own trigger (50 + 20 % of live)
        (0, DEAD_ROWS_BAD - 1, False),  # all dead, but too few to matter
        (0, DEAD_ROWS_BAD, True),
        (10_000_000, 1_500_000, False),  # many dead, yet autovacuum is not due (15 % of a big table)
        (10_000_000, 2_100_000, True),  # past the trigger: autovacuum should have run
    ],
)
def test_the_rule_needs_both_many_dead_rows_and_autovacuum_behind(live, dead, bad):
    (figure,) = vacuum_figures([{"table": "tasks", "live": live, "dead": dead, "last_vacuum": VACUUMED}])
    assert figure["bad"] is bad
    assert figure["value"].startswith(f"{dead:,} (")
