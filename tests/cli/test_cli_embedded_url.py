"""`make run` without DATABASE_URL starts the embedded Postgres, prints its DATABASE_URL and
publishes it in .skiplock/database_url while it runs; the checkout's `skiplock` finds it there
when DATABASE_URL is not set, and says on stderr which database it uses. Here the launcher's
database step runs in-process on a real embedded server of its own (a data folder and URL file
under tmp_path, not the checkout's)."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from skiplock import embedded, launcher
from skiplock.cli import main
from skiplock.db import apply_schema
from tests.helpers import UNREACHABLE_DB, assert_clean_exit, ok

pytestmark = pytest.mark.pg_agnostic


def skiplock(*args: str, database_url: str | None = None):
    """`skiplock *args` with DATABASE_URL unset (or set to database_url)."""
    return CliRunner().invoke(main, list(args), env={"DATABASE_URL": database_url})


@pytest.fixture
def url_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "skiplock" / "database_url"
    monkeypatch.setattr(embedded, "URL_FILE", path)
    return path


@pytest.fixture
def make_run_database(tmp_path, url_file, monkeypatch, capsys) -> Iterator[tuple[str, str]]:
    """(the embedded database's URL, what the launcher printed), as `make run` leaves them
    while it runs; stopped and unpublished after, as when it exits."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setattr(launcher, "EMBEDDED_DATA_DIR", tmp_path / "pgdata")
    url, is_embedded = launcher.database_url()
    assert is_embedded
    printed = capsys.readouterr().err
    try:
        apply_schema(url)
        yield url, printed
    finally:
        embedded.unpublish_url(url)
        embedded.stop(tmp_path / "pgdata")


def test_make_run_prints_and_publishes_the_embedded_url(make_run_database, url_file):
    url, printed = make_run_database
    assert f"make run: the embedded database: DATABASE_URL='{url}'" in printed
    assert url_file.read_text().strip() == url
    assert stat.S_IMODE(url_file.stat().st_mode) == 0o600  # the data folder's owner only


def test_the_cli_finds_the_embedded_database_by_itself(make_run_database, url_file):
    url, _ = make_run_database
    created = json.loads(ok(skiplock("--json", "submit", "noop", "null")))
    result = skiplock("--json", "status", str(created["task_id"]))
    assert json.loads(ok(result))["status"] == "pending"
    [line] = result.stderr.strip().splitlines()
    assert line == f"skiplock: using the embedded database of `make run` ({url_file}): DATABASE_URL={url}"


def test_database_url_wins_over_the_file(make_run_database, database_url):
    result = skiplock("--json", "queues", database_url=database_url)
    assert json.loads(ok(result)) == [] and result.stderr == ""


def test_once_make_run_stops_the_file_is_gone_and_the_cli_asks_for_database_url(make_run_database, url_file):
    url, _ = make_run_database
    embedded.unpublish_url(url)
    assert not url_file.exists()
    result = skiplock("queues")
    assert_clean_exit(result, 2)
    assert "set DATABASE_URL" in result.stderr


def test_a_stale_file_is_named_when_its_database_does_not_answer(url_file):
    """make run was killed (kill -9): its file outlived its server."""
    embedded.publish_url(UNREACHABLE_DB)
    result = skiplock("queues")
    assert_clean_exit(result, 3)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("skiplock: using the embedded database of `make run`")
    assert len(lines) == 2 and "cannot reach the database" in lines[1]
    assert f"is `make run` still running? its URL file: {url_file}" in lines[1]


def test_unpublishing_leaves_another_runs_url(url_file):
    """Two `make run`s one after the other: the first to stop must not remove the second's URL."""
    embedded.publish_url("postgresql://postgres:@/skiplock?host=/tmp/second")
    embedded.unpublish_url("postgresql://postgres:@/skiplock?host=/tmp/first")
    assert embedded.published_url() == "postgresql://postgres:@/skiplock?host=/tmp/second"
