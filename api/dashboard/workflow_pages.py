"""The dashboard's workflow page: a workflow as a graph (its tasks in columns by depth, coloured by
status, the edges between them), its counts, and a Cancel button; the overview's list of recent
workflows links here."""

from __future__ import annotations

from typing import Any

from flask import render_template
from werkzeug.exceptions import NotFound

from skiplock.errors import WorkflowNotFound
from skiplock.sql.workflow_store import workflow_get

from ..extensions import db
from .views import bp

# The graph: columns this far apart, rows this far apart, at most this many tasks per column
# drawn (a batch of 10,000 shows its first ones and how many more).
COLUMN_WIDTH = 170
ROW_HEIGHT = 34
NODE_WIDTH = 140
NODE_HEIGHT = 24
MAX_PER_COLUMN = 60
RECENT_WORKFLOWS = 10


@bp.get("/workflows/<int:workflow_id>")
def workflow(workflow_id: int):
    return render_template("dashboard/workflow.html", **workflow_data(workflow_id))


@bp.get("/workflows/<int:workflow_id>/live")
def workflow_live(workflow_id: int):
    return render_template("dashboard/_workflow.html", **workflow_data(workflow_id))


def workflow_data(workflow_id: int) -> dict[str, Any]:
    with db() as conn:
        try:
            view = workflow_get(conn, workflow_id)
        except WorkflowNotFound as exc:  # the dashboard's 404 page
            raise NotFound(str(exc)) from None
    return {"workflow": view, "graph": graph_layout(view["tasks"])}


def graph_layout(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    """Nodes in columns by depth (the longest path from a task without parents), edges between
    drawn nodes, and how many tasks each column leaves out."""
    depth: dict[str, int] = {}
    by_ref = {t["ref"]: t for t in tasks}
    for task in tasks:  # parents first: ids grow along the dependencies (stored in that order)
        depth[task["ref"]] = 1 + max((depth.get(p, 0) for p in task["depends_on"]), default=-1)
    columns: dict[int, list[dict[str, Any]]] = {}
    for task in tasks:
        columns.setdefault(depth[task["ref"]], []).append(task)
    nodes, hidden = {}, {}
    for column, members in columns.items():
        for row, task in enumerate(members[:MAX_PER_COLUMN]):
            nodes[task["ref"]] = {**task, "x": 10 + column * COLUMN_WIDTH, "y": 10 + row * ROW_HEIGHT}
        if len(members) > MAX_PER_COLUMN:
            hidden[column] = len(members) - MAX_PER_COLUMN
    edges = [
        {"x1": nodes[p]["x"] + NODE_WIDTH, "y1": nodes[p]["y"] + NODE_HEIGHT / 2,
         "x2": node["x"], "y2": node["y"] + NODE_HEIGHT / 2, "from": p, "to": ref}
        for ref, node in nodes.items() for p in by_ref[ref]["depends_on"] if p in nodes
    ]  # fmt: skip
    rows = max((min(len(m), MAX_PER_COLUMN) for m in columns.values()), default=0)
    return {
        "nodes": list(nodes.values()),
        "edges": edges,
        "hidden": [
            {"x": 10 + c * COLUMN_WIDTH, "y": 10 + MAX_PER_COLUMN * ROW_HEIGHT, "n": n}
            for c, n in hidden.items()
        ],
        "width": 20 + len(columns) * COLUMN_WIDTH,
        "height": 40 + rows * ROW_HEIGHT,
        "node_width": NODE_WIDTH,
        "node_height": NODE_HEIGHT,
    }
