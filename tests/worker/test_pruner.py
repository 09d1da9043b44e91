"""The retention duty (skiplock/worker/duties/pruner.py) against a real Postgres: a turn deletes
at most its cap, and a turn cut short by it is followed by another within CATCH_UP_SECONDS rather
than a whole prune interval later, until nothing old is left."""

from __future__ import annotations

from dataclasses import replace

from skiplock.worker.duties.pruner import CATCH_UP_SECONDS, PRUNE_BATCH, PRUNE_MAX_BATCHES_PER_TURN, Pruner


def old_tasks(conn) -> int:
    return conn.execute(
        "SELECT count(*) AS n FROM tasks WHERE finished_at < now() - interval '1 hour'"
    ).fetchone()["n"]


def test_a_turn_cut_short_by_its_cap_is_followed_by_another_soon(conn, settings):
    cap = PRUNE_BATCH * PRUNE_MAX_BATCHES_PER_TURN
    conn.execute(
        "INSERT INTO tasks (task_type, input, status, finished_at)"
        " SELECT 'noop', 'null', 'completed', now() - interval '2 hours' FROM generate_series(1, %s)",
        (cap + 2 * PRUNE_BATCH + 5,),
    )
    pruner = Pruner(replace(settings, retention_seconds=3600.0, prune_interval_seconds=600.0))
    now = 10_000.0
    first = pruner.run_if_due(conn, now)
    assert 0 < first <= cap and first % PRUNE_BATCH == 0  # cut short: full batches only
    assert pruner.run_if_due(conn, now + CATCH_UP_SECONDS - 0.1) == 0  # not due yet
    turns = 1
    while old_tasks(conn) and turns < 20:
        now += CATCH_UP_SECONDS
        assert pruner.run_if_due(conn, now) > 0
        turns += 1
    assert old_tasks(conn) == 0
    # Caught up: the next turn is a whole prune interval away again.
    conn.execute(
        "INSERT INTO tasks (task_type, input, status, finished_at) VALUES ('noop', 'null', 'completed', now() - interval '2 hours')"
    )
    assert pruner.run_if_due(conn, now + CATCH_UP_SECONDS) == 0
    assert pruner.run_if_due(conn, now + 600.0) == 1
