"""The systemd units in deploy/ agree with the code they run: systemd must not SIGKILL a worker
inside its grace period, nor gunicorn inside its graceful timeout."""

from __future__ import annotations

import configparser
import runpy

import pytest

from skiplock.settings import DEFAULT_SHUTDOWN_GRACE_SECONDS
from tests.helpers import ROOT

# The same on every Postgres version: CI runs it against one Postgres only (.ci/run).
pytestmark = pytest.mark.pg_agnostic

UNITS = ROOT / "deploy" / "systemd"
# After the grace period a stopping worker still writes its hand-backs (the writer gets at least
# 2 s, see Supervisor._shutdown) and stops its processes (2 s).
WORKER_STOP_AFTER_GRACE_SECONDS = 5


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNITS / name)
    return parser


def test_the_worker_unit_outlasts_the_grace_period():
    service = unit("skiplock-worker.service")["Service"]
    assert service["ExecStart"].endswith("python worker.py")
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] in ("mixed", "control-group")  # both are graceful (tests/chaos/test_faults.py)
    assert (
        float(service["TimeoutStopSec"]) >= DEFAULT_SHUTDOWN_GRACE_SECONDS + WORKER_STOP_AFTER_GRACE_SECONDS
    )


def test_the_api_unit_outlasts_gunicorns_graceful_timeout():
    service = unit("skiplock-api.service")["Service"]
    assert "gunicorn -c gunicorn.conf.py wsgi:app" in service["ExecStart"]
    config = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert float(service["TimeoutStopSec"]) > config["graceful_timeout"]


@pytest.mark.parametrize("name", ["skiplock-worker.service", "skiplock-api.service"])
def test_units_have_the_sections_systemd_needs(name):
    parsed = unit(name)
    assert {"Unit", "Service", "Install"} <= set(parsed.sections())
    assert parsed["Install"]["WantedBy"] == "multi-user.target"
