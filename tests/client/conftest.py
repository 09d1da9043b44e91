"""The client against the API as deployed: real gunicorn (auth on) and a real worker.py on a
database of this module's own, with client keys made as an operator makes them."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest
from skiplock_client import Client

from skiplock import keys
from skiplock.db import connect
from skiplock.settings import Settings
from tests.conftest import FAST
from tests.helpers import cloned_database, spawn_worker, start_gunicorn, stop_process


@dataclass
class Served:
    base_url: str
    database_url: str
    token: str  # a client key's
    other_token: str  # another client key's: sees none of the first one's tasks

    def new_key(self, **limits) -> str:
        """A new client key's token (rate_per_second, burst, max_unfinished...)."""
        with connect(self.database_url, role="test") as conn:
            return keys.create_key(conn, name="client-tests", **limits)["token"]


@pytest.fixture(scope="module")
def served(server_url, template_db) -> Iterator[Served]:
    """gunicorn and worker.py on a database of the module's own (started once: every test makes
    its own tasks, and reads only those)."""
    with cloned_database(server_url, template_db, "client") as url:
        settings = replace(Settings(database_url=url, **FAST), auth="on")
        served = Served("", url, "", "")
        served.token, served.other_token = served.new_key(), served.new_key()
        gunicorn, http = start_gunicorn(settings, workers=2, quiet=True)
        worker = spawn_worker(settings, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        served.base_url = http.base
        try:
            yield served
        finally:
            stop_process(worker)
            stop_process(gunicorn)


@pytest.fixture
def client(served) -> Iterator[Client]:
    with Client(served.base_url, served.token) as c:
        yield c


@pytest.fixture
def make_client(served) -> Iterator[Callable[..., Client]]:
    """make_client(api_key=the client key, base_url=gunicorn's, **Client options), closed after."""
    made: list[Client] = []

    def make(api_key: str | None = served.token, base_url: str = served.base_url, **options) -> Client:
        made.append(Client(base_url, api_key, **options))
        return made[-1]

    yield make
    for c in made:
        c.close()
