"""What the API says about itself, through the real Flask app: GET /api/task-types, the OpenAPI
document, the docs and the probes."""

from __future__ import annotations

from skiplock.db import SCHEMA_VERSION
from tests.helpers import assert_error, row_count, submit_id, task_row, task_types

# --- GET /api/task-types -----------------------------------------------------------------------


def test_task_types_lists_builtin_and_custom_types(client):
    types = task_types(client)
    expected = {
        "default",
        "primes",
        "hash_chain",
        "noop",
        "sleep",
        "fail",
        "crash",
        "greet",
        "hang",
        "pid",
        "stamp",
    }
    assert expected <= set(types)
    for task in types.values():
        assert set(task) == {"name", "description", "timeout_seconds", "max_attempts", "input_schema"}
        assert isinstance(task["input_schema"], dict)
        assert task["description"]


def test_task_types_give_defaults_and_input_json_schema(client):
    types = task_types(client)
    greet = types["greet"]
    assert (greet["timeout_seconds"], greet["max_attempts"]) == (10, 2)
    assert greet["input_schema"]["type"] == "object"
    assert greet["input_schema"]["required"] == ["name"]
    assert greet["input_schema"]["properties"]["name"] == {"type": "string", "minLength": 1, "maxLength": 50}
    primes = types["primes"]["input_schema"]
    assert primes["required"] == ["limit"]
    assert primes["properties"]["limit"]["type"] == "integer"
    assert set(types["hash_chain"]["input_schema"]["required"]) == {"data", "rounds"}


def test_without_allow_crash_the_crash_type_is_gone_and_refused(make_client, conn):
    safe = make_client(allow_crash=False)
    assert "crash" not in task_types(safe)
    assert "TaskInput.crash" not in safe.get("/openapi.json").get_json()["components"]["schemas"]
    body = assert_error(safe.post("/api/submit-task", json={"task_input": None, "task_type": "crash"}), 422)
    assert "task_type" in body["errors"]["json"]
    assert row_count(conn) == 0


def test_apps_with_different_settings_keep_their_own_documents(client, make_client):
    make_client(allow_crash=False)
    assert "crash" in task_types(client)
    assert "TaskInput.crash" in client.get("/openapi.json").get_json()["components"]["schemas"]


def test_with_allow_crash_a_crash_task_can_be_submitted(client, conn):
    assert task_row(conn, submit_id(client, None, task_type="crash"))["task_type"] == "crash"


# --- OpenAPI, docs, probes ---------------------------------------------------------------------


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_openapi_document_describes_every_endpoint(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.get_json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] == "skiplock" and doc["info"]["version"]
    methods = {"get", "post", "put", "patch", "delete"}
    operations = {path: set(item) & methods for path, item in doc["paths"].items()}
    assert operations == {
        "/api/submit-task": {"post"},
        "/api/task-status/{task_id}": {"get"},
        "/api/task-result/{task_id}": {"get"},
        "/api/tasks": {"get", "post"},
        "/api/tasks/batch": {"post"},
        "/api/tasks/{task_id}": {"get"},
        "/api/tasks/{task_id}/attempts": {"get"},
        "/api/tasks/{task_id}/events": {"get"},
        "/api/tasks/{task_id}/stream-token": {"post"},
        "/api/workflows/{workflow_id}/stream-token": {"post"},
        "/api/tasks/{task_id}/webhooks": {"get"},
        "/api/webhooks/secret": {"get"},
        "/api/webhooks/{delivery_id}/resend": {"post"},
        "/api/tasks/{task_id}/cancel": {"post"},
        "/api/tasks/{task_id}/retry": {"post"},
        "/api/task-types": {"get"},
        "/api/keys": {"get", "post"},
        "/api/keys/{key_id}/revoke": {"post"},
        "/api/queues": {"get"},
        "/api/queues/{queue}/pause": {"post"},
        "/api/queues/{queue}/limit": {"get", "put", "delete"},
        "/api/concurrency-limits": {"get"},
        "/api/concurrency-limits/{key}": {"get", "put", "delete"},
        "/api/schedules": {"get", "post"},
        "/api/schedules/{schedule_id}": {"get", "patch", "delete"},
        "/api/schedules/{schedule_id}/pause": {"post"},
        "/api/schedules/{schedule_id}/resume": {"post"},
        "/api/schedules/{schedule_id}/run": {"post"},
        "/api/workflows": {"post"},
        "/api/workflows/{workflow_id}": {"get"},
        "/api/workflows/{workflow_id}/cancel": {"post"},
        "/api/workflows/{workflow_id}/events": {"get"},
        "/api/keys/{key_id}": {"patch"},
        "/api/task-types/{name}/limit": {"get"},
        "/api/queues/{queue}/resume": {"post"},
        "/healthz": {"get"},
        "/readyz": {"get"},
    }
    for path, item in doc["paths"].items():
        for method in set(item) & methods:
            assert item[method]["responses"], f"{method} {path}"
            assert item[method]["summary"], f"{method} {path}"
    assert "409" in doc["paths"]["/api/task-result/{task_id}"]["get"]["responses"]
    assert "410" in doc["paths"]["/api/task-status/{task_id}"]["get"]["responses"]


def test_openapi_references_all_resolve(client):
    doc = client.get("/openapi.json").get_json()
    refs = set(_refs(doc))
    assert refs
    for ref in refs:
        assert ref.startswith("#/")
        target = doc
        for part in ref[2:].split("/"):
            assert part in target, ref
            target = target[part]


def test_openapi_has_an_input_schema_per_task_type(client):
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    types = task_types(client)
    for name, task in types.items():
        assert schemas[f"TaskInput.{name}"] == task["input_schema"]
    assert {"SubmitTask", "Task", "TaskResult", "Error"} <= set(schemas)


def test_docs_page_and_its_static_files_are_served(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    assert "/docs/static/swagger-ui-bundle.js" in page.get_data(as_text=True)
    with client.get("/docs/static/swagger-ui-bundle.js") as bundle:
        assert bundle.status_code == 200
        assert "javascript" in bundle.mimetype
        assert b"SwaggerUIBundle" in bundle.get_data()


def test_health_and_readiness_probes(client):
    health = client.get("/healthz")
    assert (health.status_code, health.get_json()) == (200, {"status": "ok"})
    ready = client.get("/readyz")
    assert (ready.status_code, ready.get_json()) == (
        200,
        {"status": "ready", "schema_version": SCHEMA_VERSION},
    )
