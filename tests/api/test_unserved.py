"""Due tasks no live worker runs, as the API shows them: the task's waiting_for (reason
no_worker), /metrics (skiplock_tasks_unserved) and the dashboard's health figures. Workers on
record hold a session's advisory lock (tests/live_workers.py)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import insert_task
from tests.live_workers import serving_worker

pytestmark = pytest.mark.pg_agnostic


def waiting_for(client, task_id: int) -> dict:
    response = client.get(f"/api/tasks/{task_id}")
    assert response.status_code == 200
    return response.get_json()["waiting_for"]


def unserved_samples(client) -> dict[tuple[str, str], float]:
    families = {
        f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
    }
    return {
        (s.labels["task_type"], s.labels["queue"]): s.value
        for s in families["skiplock_tasks_unserved"].samples
    }


def test_waiting_for_names_the_task_type_no_live_worker_runs(client, database_url, conn):
    stuck = insert_task(conn, "resize", queue="images")
    served = insert_task(conn, "noop", queue="images")
    with serving_worker(database_url, conn, ["noop"]):
        waits = waiting_for(client, stuck)
        assert waits["reason"] == "no_worker"
        assert "No live worker runs task type 'resize' in queue 'images'" in waits["detail"]
        assert "SKIPLOCK_TASK_MODULES" in waits["detail"]
        assert waiting_for(client, served)["reason"] != "no_worker"
        with serving_worker(database_url, conn, ["resize"], queues=["other"]):  # not its queue
            assert waiting_for(client, stuck)["reason"] == "no_worker"
        with serving_worker(database_url, conn, ["resize"], queues=["images"]):
            assert waiting_for(client, stuck)["reason"] != "no_worker"


def test_a_paused_queue_or_a_later_run_at_comes_first(client, database_url, conn):
    later = insert_task(conn, "resize", delay_seconds=3600)
    with serving_worker(database_url, conn, ["noop"]):
        assert waiting_for(client, later)["reason"] == "run_at"


def test_metrics_count_unserved_tasks_per_type_and_queue(client, database_url, conn):
    for queue in ("images", "images", "default"):
        insert_task(conn, "resize", queue=queue)
    insert_task(conn, "noop")
    with serving_worker(database_url, conn, ["noop"]):
        assert unserved_samples(client) == {("resize", "images"): 2.0, ("resize", "default"): 1.0}


def test_metrics_count_nothing_unserved_without_any_live_worker(client, conn):
    """That is skiplock_workers 0, one alarm rather than one per type."""
    insert_task(conn, "resize")
    assert unserved_samples(client) == {}


def test_the_dashboard_warns_of_tasks_no_worker_runs(client, database_url, conn):
    insert_task(conn, "resize", queue="images")
    with serving_worker(database_url, conn, ["noop"]):
        page = client.get("/dashboard/live")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    figure = html[html.index("Due tasks no worker runs") - 200 :]
    assert 'class="figure bad"' in figure[:250]
    assert "resize (1 in images)" in figure


def test_the_dashboard_figure_is_quiet_when_every_type_is_run(client, database_url, conn):
    insert_task(conn, "noop")
    with serving_worker(database_url, conn, ["noop"]):
        html = client.get("/dashboard/live").get_data(as_text=True)
    figure = html[html.index("Due tasks no worker runs") - 200 :]
    assert 'class="figure bad"' not in figure[:250]
