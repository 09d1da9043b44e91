"""OpenTelemetry: a submit's trace context is stored with its task, the run span is its child (a
retry's is linked to it), webhooks carry its traceparent. Spans go to the SDK's in-memory
exporter; the task code runs through the executor's own run_one (what a task process runs)."""

from __future__ import annotations

import multiprocessing
from dataclasses import replace

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from skiplock.registry import load_registry
from skiplock.worker.executor import RunTask, run_one
from tests.helpers import LOOPBACK, Receiver, claim, task_row, wait_until

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
_EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans():
    """The in-memory exporter of this process's tracer provider (a process has one: set once)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def stored_context(conn, task_id: int):
    return conn.execute("SELECT trace_context FROM tasks WHERE id = %s", (task_id,)).fetchone()[
        "trace_context"
    ]


def test_a_submit_stores_the_requests_traceparent_and_only_then(client, conn):
    traced = client.post(
        "/api/tasks", json={"task_type": "noop", "task_input": None}, headers={"traceparent": TRACEPARENT}
    )
    untraced = client.post("/api/tasks", json={"task_type": "noop", "task_input": None})
    batch = client.post(
        "/api/tasks/batch",
        json={"tasks": [{"task_type": "noop", "task_input": i} for i in range(3)]},
        headers={"traceparent": TRACEPARENT},
    )

    assert stored_context(conn, traced.get_json()["task_id"]) == {"traceparent": TRACEPARENT}
    assert stored_context(conn, untraced.get_json()["task_id"]) is None
    assert batch.status_code == 202, batch.get_json()
    for task_id in batch.get_json()["task_ids"]:
        assert stored_context(conn, task_id) == {"traceparent": TRACEPARENT}
    workflow = client.post(
        "/api/workflows",
        json={
            "tasks": [
                {"ref": "a", "task_type": "noop", "task_input": None},
                {"ref": "b", "task_type": "noop", "task_input": None, "depends_on": ["a"]},
            ]
        },
        headers={"traceparent": TRACEPARENT},
    )
    assert workflow.status_code == 201, workflow.get_json()
    steps = conn.execute(
        "SELECT trace_context FROM tasks WHERE workflow_id = %s", (workflow.get_json()["workflow_id"],)
    ).fetchall()
    assert [s["trace_context"] for s in steps] == [{"traceparent": TRACEPARENT}] * 2
    # A malformed header is no trace (and no error).
    bad = client.post(
        "/api/tasks", json={"task_type": "noop", "task_input": None}, headers={"traceparent": "x"}
    )
    assert bad.status_code == 202 and stored_context(conn, bad.get_json()["task_id"]) is None


def test_an_instrumented_api_stores_its_own_span(client, conn, spans):
    # The test client runs the request in this thread: the span below is the request's, as an
    # instrumented Flask app's server span would be.
    with trace.get_tracer("test").start_as_current_span("POST /api/tasks") as span:
        answer = client.post("/api/tasks", json={"task_type": "noop", "task_input": None})

    stored = stored_context(conn, answer.get_json()["task_id"])
    context = span.get_span_context()
    assert stored["traceparent"].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")


def test_the_claim_hands_the_context_to_the_worker(client, conn):
    answer = client.post(
        "/api/tasks", json={"task_type": "noop", "task_input": None}, headers={"traceparent": TRACEPARENT}
    )

    (task,) = claim(conn)

    assert task.id == answer.get_json()["task_id"]
    assert task.trace_context == {"traceparent": TRACEPARENT}


def run_in_this_process(task_type: str, value, attempt: int, carrier) -> tuple:
    registry = load_registry(("tests.sample_tasks",))
    ours, _theirs = multiprocessing.Pipe()
    return run_one(registry, ours, RunTask(7, attempt, 3, task_type, value, None, "images", carrier))


def test_the_first_run_is_a_child_of_the_submit(spans):
    outcome = run_in_this_process("greet", {"name": "Ada"}, 1, {"traceparent": TRACEPARENT})

    assert outcome[0] == "done"
    (span,) = spans.get_finished_spans()
    assert span.name == "run greet" and span.kind is SpanKind.CONSUMER
    assert span.context.trace_id == int(TRACE_ID, 16)
    assert span.parent is not None and span.parent.span_id == int(SPAN_ID, 16)
    assert span.attributes["messaging.message.id"] == "7"
    assert span.attributes["messaging.destination.name"] == "images"
    assert span.attributes["skiplock.attempt"] == 1
    assert span.status.status_code is not StatusCode.ERROR


def test_a_retry_is_linked_to_the_submit_and_a_failure_recorded(spans):
    outcome = run_in_this_process("fail", {"times": 5, "message": "flaky"}, 2, {"traceparent": TRACEPARENT})

    assert outcome[0] == "error"
    (span,) = spans.get_finished_spans()
    assert span.parent is None and span.context.trace_id != int(TRACE_ID, 16)
    (link,) = span.links
    assert (link.context.trace_id, link.context.span_id) == (int(TRACE_ID, 16), int(SPAN_ID, 16))
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


def test_an_untraced_task_runs_in_a_root_span_when_the_sdk_is_set(spans):
    run_in_this_process("greet", {"name": "Ada"}, 1, None)

    (span,) = spans.get_finished_spans()
    assert span.parent is None and not span.links


def test_webhooks_carry_the_tasks_traceparent(make_app, settings, conn, start_worker):
    receiver = Receiver().start()
    try:
        hook_settings = replace(settings, webhook_allow=LOOPBACK)
        api = make_app(webhook_allow=LOOPBACK).test_client()
        answer = api.post(
            "/api/tasks",
            json={"task_type": "noop", "task_input": None, "callback_url": receiver.url},
            headers={"traceparent": TRACEPARENT},
        )
        assert answer.status_code == 202, answer.get_json()
        start_worker(**vars(hook_settings))

        (copy,) = receiver.copies(1)

        assert copy.headers["traceparent"] == TRACEPARENT
        assert task_row(conn, answer.get_json()["task_id"])["status"] == "completed"
        wait_until(
            lambda: conn.execute(
                "SELECT bool_and(status = 'delivered') AS d FROM webhook_deliveries"
            ).fetchone()["d"]
        )
    finally:
        receiver.stop()
