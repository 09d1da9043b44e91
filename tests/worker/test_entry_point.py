"""One worker entry point: `python worker.py` runs the very command `skiplock worker` is (same
options, help, refusals and exit codes); the Procfile and the systemd unit run worker.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# The same on every Postgres version (none of these reach a database).
pytestmark = pytest.mark.pg_agnostic

WORKER_PY = [sys.executable, str(ROOT / "worker.py")]
SKIPLOCK_WORKER = [sys.executable, "-m", "skiplock.cli", "worker"]


def run(command: list[str], *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.startswith("SKIPLOCK_")}
    return subprocess.run(
        [*command, *args], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """What it said was wrong: click's `Error: …` for a bad option, `<program>: …` for settings
    it refuses; without the program's name (worker.py or skiplock)."""
    said = []
    for line in result.stderr.splitlines():
        for prefix in ("Error: ", "worker.py: ", "skiplock: "):
            if line.startswith(prefix):
                said.append(line.removeprefix(prefix))
    return said


def test_the_help_is_the_same_but_for_the_program_name():
    script, command = run(WORKER_PY, "--help"), run(SKIPLOCK_WORKER, "--help")
    assert script.returncode == command.returncode == 0
    usage, *rest = script.stdout.splitlines()
    assert usage == "Usage: worker.py [OPTIONS]"
    assert command.stdout.splitlines()[1:] == rest


@pytest.mark.parametrize(
    "args, env, says",
    [
        ((), {}, "set DATABASE_URL"),
        (
            (),
            {
                "DATABASE_URL": "postgresql://nowhere.invalid/x",
                "SKIPLOCK_DATABASE_POOLER": "transaction",
                "SKIPLOCK_LISTEN_DATABASE_URL": "postgresql://nowhere.invalid/x",
            },
            "SKIPLOCK_DATABASE_POOLER=session",
        ),
        (
            (),
            {"DATABASE_URL": "postgresql://nowhere.invalid/x", "SKIPLOCK_LOG_FORMAT": "xml"},
            "SKIPLOCK_LOG_FORMAT",
        ),
        (("--concurrency", "0"), {}, "--concurrency"),
        (("--queue", "no good"), {}, "no good"),
        (("--metrics-port", "70000"), {}, "--metrics-port"),
    ],
    ids=["no database", "pooler", "log format", "concurrency", "queue", "metrics port"],
)
def test_both_refuse_the_same_settings_with_the_same_words(args, env, says):
    script, command = run(WORKER_PY, *args, **env), run(SKIPLOCK_WORKER, *args, **env)
    assert script.returncode == command.returncode == 2
    assert script.stdout == command.stdout == ""
    assert error_lines(script) == error_lines(command) != []
    assert says in error_lines(script)[0]
    if not args:  # settings from the environment are refused in one line, not click's usage text
        assert script.stderr.startswith("worker.py: ") and len(script.stderr.splitlines()) == 1
        assert command.stderr.startswith("skiplock: ") and len(command.stderr.splitlines()) == 1


def test_the_procfile_and_the_unit_run_worker_py():
    procfile = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line)
    assert procfile["worker"] == "python worker.py"
    unit = (ROOT / "deploy" / "systemd" / "skiplock-worker.service").read_text()
    [exec_start] = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start.endswith("python worker.py")
