"""OpenTelemetry tracing, when the `opentelemetry-api` package is installed (`pip install
skiplock[tracing]`); without it every function here costs a check of one module-level flag.

A task's trace context (a W3C `traceparent`, and `tracestate` if any) is stored with it
(tasks.trace_context) when it is submitted: the submit request's, that is the span of an
instrumented API (opentelemetry-instrumentation-flask) or the `traceparent` header the client
sent. The task process then runs the task inside a span `run <task_type>`: a child of that
context on the first attempt; a retry starts a trace of its own *linked* to it (an attempt that
runs minutes later is a new piece of work caused by the submit, not a part of its request).
Webhooks carry the stored `traceparent` (skiplock.webhooks.sender), so a receiver joins the trace.

The spans are made with the global tracer provider of the task process: configure the SDK there
(in a process setup hook, see docs/heavy-tasks.md), not in the supervisor.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

TRACER_NAME = "skiplock"
# The carrier keys a webhook passes on (W3C Trace Context).
WEBHOOK_HEADERS = ("traceparent", "tracestate")


def _otel() -> Any:
    """opentelemetry's propagate and trace modules, imported on first use (None without the
    package): a process that traces nothing never pays for the import (~85 ms at each worker
    and task process start)."""
    try:
        from opentelemetry import propagate, trace
    except ImportError:  # the optional extra is not installed: no tracing
        return None
    return propagate, trace


def _in_use() -> bool:
    """Whether anything in this process imported opentelemetry (an SDK set up, an instrumented
    app): without it there is no current span nor tracer provider to look at."""
    return "opentelemetry" in sys.modules


def submit_context(headers: Any) -> str | None:
    """The trace context to store with a task submitted now, as JSON text (None: no trace):
    the current span if the API is instrumented, else the request's own `traceparent`.
    `headers`: the request's (werkzeug's Headers, or any mapping with .get and `in`)."""
    if "traceparent" not in headers and not _in_use():
        return None
    otel = _otel()
    if otel is None:
        return None
    propagate, trace = otel
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(carrier)
    elif "traceparent" in headers:
        propagate.inject(carrier, context=propagate.extract(headers))
    return json.dumps(carrier, sort_keys=True) if carrier else None


@contextlib.contextmanager
def run_span(task_type: str, task_id: int, attempt: int, queue: str, carrier: Any) -> Iterator[None]:
    """The span a task runs in (see the module's docstring). An exception leaving it is recorded
    on the span, which ends with an error status."""
    otel = _otel() if carrier is not None or _in_use() else None
    if otel is None:
        yield  # nothing to trace into, and nothing set up to trace with
        return
    propagate, trace = otel
    if carrier is None and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        yield  # no SDK configured in this process: no span worth making
        return
    parent = propagate.extract(carrier) if isinstance(carrier, dict) else None
    links = []
    if parent is not None and attempt > 1:
        linked = trace.get_current_span(parent).get_span_context()
        if linked.is_valid:
            links.append(trace.Link(linked, {"skiplock.link": "submit"}))
        parent = None  # a retry: a trace of its own, linked to the submit's
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"run {task_type}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes={
            "messaging.system": "skiplock",
            "messaging.operation.type": "process",
            "messaging.destination.name": queue,
            "messaging.message.id": str(task_id),
            "skiplock.task_type": task_type,
            "skiplock.attempt": attempt,
        },
    ):
        yield


def webhook_headers(carrier: Any) -> dict[str, str]:
    """The trace headers of a webhook about a task with this stored context (no SDK needed)."""
    if not isinstance(carrier, dict):
        return {}
    return {k: v for k, v in carrier.items() if k in WEBHOOK_HEADERS and isinstance(v, str)}
