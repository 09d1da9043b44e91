"""How rows come back from the queries: as dicts (skiplock.db opens every connection with
psycopg's dict_row), each query stating their keys as a TypedDict of its family's module."""

from __future__ import annotations

from typing import Any, TypeAlias

import psycopg

# A connection as skiplock.db opens them. Its rows are dicts, typed by each query's TypedDict
# (psycopg's own typing knows only the row factory a connection was declared with).
Connection: TypeAlias = "psycopg.Connection[Any]"


def one_row(cursor: psycopg.Cursor[Any]) -> Any:
    """The row of a statement that always returns exactly one (an INSERT of one VALUES row, an
    aggregate, a SELECT without FROM)."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row
