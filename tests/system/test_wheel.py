"""skiplock installs like a library: the wheel built from this checkout, installed in a fresh
virtualenv away from it, runs a user's project (its own task module, and its own package named
`api`) end to end: `skiplock schema apply`, `skiplock keys create`, `skiplock worker` and gunicorn
serving the installed API, over real HTTP.

The wheel is built from a copy of the sources (no build/ or *.egg-info in the checkout, and runs
at once do not share them). Its dependencies come from the package index, held to the exact
versions requirements.txt pins (as constraints: what the wheel declares is what gets installed,
so a missing declaration fails here, and a bound that refuses a pin fails the install)."""

from __future__ import annotations

import email
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import psycopg
import pytest
from packaging.requirements import Requirement
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.helpers import ROOT, TEST_DB_PREFIX, free_port, stop_process, wait_until

# Packaging does not depend on the Postgres version: .ci/run runs this against one.
pytestmark = [pytest.mark.slow, pytest.mark.pg_agnostic]

# What the wheel is built from (pyproject.toml names the rest: the packages, their data, the readme).
SOURCES = ("pyproject.toml", "README.md", "schema.sql", "skiplock", "api")
# The API, as the README documents running it from an installed skiplock.
GUNICORN_CONFIG = "python:skiplock.api.serving.gunicorn_conf"
GUNICORN_APP = "skiplock.api:create_app()"
PIP_SECONDS = 300
# What gunicorn's on_starting hook logs (api/serving/metrics_dir.py).
METRICS_DIR_MESSAGE = "metrics of the worker processes in "

# A user's project: its task types in a package of its own, which uses its own package `api`.
USER_API = '''
"""The user's own `api` package: skiplock's API is skiplock.api, so both can be imported."""

def shout(text: str) -> str:
    return text.upper() + "!"
'''
USER_TASKS = '''
from marshmallow import Schema, fields

from api import shout
from skiplock.registry import task_type


class ShoutInput(Schema):
    text = fields.String(required=True)


@task_type("myproject.shout", input=ShoutInput, timeout_seconds=30)
def shout_task(data, ctx):
    """Shout the text (with the user's own api.shout)."""
    return {"shouted": shout(data["text"]), "attempt": ctx.attempt}
'''


def outside_environment() -> dict[str, str]:
    """This environment without what points at the checkout or configures this test run: no
    PYTHONPATH (the checkout's skiplock would shadow the wheel's), no virtualenv, no settings."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PYTHON", "SKIPLOCK_", "VIRTUAL_ENV", "PROMETHEUS_"))
        and name not in ("DATABASE_URL", "WEB_CONCURRENCY")
    }


def run(*args: str | Path, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", outside_environment())
    result = subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def build_wheel(workdir: Path) -> Path:
    source = workdir / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    dist = workdir / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", dist]
    run(*pip_wheel, source, timeout=PIP_SECONDS)
    (wheel,) = dist.glob("skiplock-*.whl")
    return wheel


def constraints(workdir: Path) -> Path:
    """requirements.txt's pins as pip constraints (which take no extras: psycopg[binary])."""
    path = workdir / "constraints.txt"
    pins = [re.sub(r"\[[^]]*\]", "", line) for line in (ROOT / "requirements.txt").read_text().splitlines()]
    path.write_text("\n".join(pins) + "\n")
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A fresh virtualenv (outside the checkout) with the wheel and the dependencies it declares."""
    workdir = tmp_path_factory.mktemp("venv")
    venv = workdir / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    run(base_python, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run(*pip, "-c", constraints(workdir), wheel, timeout=PIP_SECONDS, cwd=workdir)
    return venv


def package_names(root: Path, prefix: str) -> set[str]:
    return {
        ".".join((prefix, *init.parent.relative_to(root).parts))
        for init in root.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def test_the_wheel_holds_every_package_the_schema_and_the_dashboards_files(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        schema = archive.read("skiplock/sql/schema.sql")
        (metadata_name,) = (name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(metadata_name))
    packages = {name.rsplit("/", 1)[0].replace("/", ".") for name in names if name.endswith("/__init__.py")}
    # The checkout's api/ is skiplock.api: the wheel adds one top-level name, never `api`.
    checkout = package_names(ROOT / "skiplock", "skiplock") | package_names(ROOT / "api", "skiplock.api")
    assert packages == checkout
    assert {name.split("/", 1)[0] for name in names if not name.startswith("skiplock-")} == {"skiplock"}
    # The file itself (skiplock/sql/schema.sql is a symlink in the checkout), as DBAs read it.
    assert schema == (ROOT / "schema.sql").read_bytes()
    for folder in ("templates", "static"):
        for path in (ROOT / "api" / "dashboard" / folder).rglob("*"):
            if path.is_file():
                assert f"skiplock/api/{path.relative_to(ROOT / 'api').as_posix()}" in names

    # Every dependency it declares is one requirements.txt pins, and the pin is within its bounds.
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            pins[pin.name.lower().replace("_", "-")] = str(pin.specifier).removeprefix("==")
    declared = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    assert declared
    for requirement in declared:
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{requirement} is not pinned in requirements.txt"
        assert requirement.specifier.contains(pins[name]), f"pinned {name}=={pins[name]}: {requirement}"


@pytest.fixture
def empty_database(server_url):
    """A new database without the schema (the installed `skiplock schema apply` applies it)."""
    name = f"{TEST_DB_PREFIX}wheel_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(server_url, dbname=name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def project(tmp_path) -> Path:
    """The user's project folder, away from the checkout: myproject/tasks.py and api/."""
    root = tmp_path / "project"
    files = {"myproject/__init__.py": "", "myproject/tasks.py": USER_TASKS, "api/__init__.py": USER_API}
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(textwrap.dedent(text))
    return root


def user_environment(venv: Path, project: Path, database_url: str) -> dict[str, str]:
    """The user's shell: the venv's commands first, their project importable, nothing of ours."""
    env = outside_environment()
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        VIRTUAL_ENV=str(venv),
        PYTHONPATH=str(project),
        DATABASE_URL=database_url,
        SKIPLOCK_TASK_MODULES="myproject.tasks",
        SKIPLOCK_POLL_INTERVAL_SECONDS="0.2",
    )
    return env


def http(base: str, method: str, path: str, token: str, body=None) -> tuple[int, dict]:
    request = urllib.request.Request(
        base + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def test_a_users_project_runs_on_the_installed_wheel(venv, project, empty_database, tmp_path):
    env = user_environment(venv, project, empty_database)
    bin_ = venv / "bin"

    # The modules come from the venv, the user's `api` from their project.
    probe = "import api, skiplock.api, skiplock.db as db; print(skiplock.api.__file__, api.__file__, db.SCHEMA_PATH)"
    where = run(bin_ / "python", "-c", probe, cwd=project, env=env).stdout.split()
    site_packages = str(venv / "lib")
    assert where[0].startswith(site_packages) and where[2].startswith(site_packages), where
    assert where[1] == str(project / "api" / "__init__.py")

    def skiplock(*args: str) -> str:
        return run(bin_ / "skiplock", *args, cwd=project, env=env).stdout

    assert skiplock("schema", "apply").strip() == "applied schema.sql"
    token = json.loads(skiplock("keys", "create", "--name", "ops", "--admin", "--json"))["token"]

    # gunicorn's master loads its config (and logger class) before its hooks run and before gevent
    # patches the workers: none of the app may come with it, least of all prometheus-client (its
    # processes would not share their metrics) and ssl.
    probe = f"import sys, {GUNICORN_CONFIG.removeprefix('python:')}; print(*sys.modules)"
    loaded = set(run(bin_ / "python", "-c", probe, cwd=project, env=env).stdout.split())
    assert not {"flask", "prometheus_client", "ssl", "psycopg"} & loaded

    logs = tmp_path / "logs"
    logs.mkdir()
    worker_log = (logs / "worker.log").open("w")
    api_log = (logs / "gunicorn.log").open("w")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker = subprocess.Popen(
        [str(bin_ / "skiplock"), "worker", "--concurrency", "1"],
        cwd=project, env=env, stdout=worker_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    api = subprocess.Popen(
        [str(bin_ / "gunicorn"), "-c", GUNICORN_CONFIG, "-b", f"127.0.0.1:{port}", "-w", "1", GUNICORN_APP],
        cwd=project, env={**env, "SKIPLOCK_LOG_FORMAT": "json"}, stdout=api_log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def output() -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()}" for path in sorted(logs.iterdir()))

    try:

        def answers() -> bool:
            assert api.poll() is None, output()
            try:
                return http(base, "GET", "/healthz", token)[0] == 200
            except OSError:
                return False

        wait_until(answers, timeout=60, message="the installed API to answer")
        code, types = http(base, "GET", "/api/task-types", token)
        assert code == 200, types
        assert "myproject.shout" in json.dumps(types)

        shout = {"task_type": "myproject.shout", "task_input": {"text": "hello"}}
        code, submitted = http(base, "POST", "/api/tasks", token, shout)
        assert code == 202, submitted
        task_id = submitted["task_id"]

        def finished() -> dict | None:
            assert worker.poll() is None, output()
            code, status = http(base, "GET", f"/api/task-status/{task_id}", token)
            assert code == 200, status
            return status if status["status"] in ("completed", "failed") else None

        status = wait_until(finished, timeout=60, message="the user's task to finish")
        assert status["status"] == "completed", (status, output())
        code, result = http(base, "GET", f"/api/task-result/{task_id}", token)
        assert (code, result["result"]) == (200, {"shouted": "HELLO!", "attempt": 1}), output()

        # Metrics of the gunicorn processes (the directory its hooks made), and the queue's.
        with urllib.request.urlopen(
            urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {token}"}),
            timeout=10,
        ) as answer:
            metrics = answer.read().decode()
        submits = [
            sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "skiplock_http_requests_total" and sample.labels.get("route") == "/api/tasks"
        ]
        assert submits == [1.0], metrics

        # The dashboard's templates and files, and Swagger UI's, come from the installed packages.
        for path, expected in (
            ("/dashboard/login", b"<form"),
            ("/dashboard/static/dashboard.css", b"{"),
            ("/docs/static/swagger-ui.css", b"{"),
        ):
            with urllib.request.urlopen(base + path, timeout=10) as answer:
                assert answer.status == 200 and expected in answer.read(), path
    finally:
        worker_code, api_code = stop_process(worker, 30), stop_process(api, 30)
        worker_log.close()
        api_log.close()
    assert (worker_code, api_code) == (0, 0), output()

    # gunicorn ran the installed config: its logger class (JSON lines) and its hooks (the metrics
    # directory made on starting, removed on exit).
    lines = (logs / "gunicorn.log").read_text().splitlines()
    messages = [json.loads(line)["message"] for line in lines if line.startswith("{")]
    made = [m.removeprefix(METRICS_DIR_MESSAGE) for m in messages if m.startswith(METRICS_DIR_MESSAGE)]
    assert len(made) == 1 and not Path(made[0]).exists(), output()
    assert not [message for message in messages if "Warning" in message], output()
