"""Schemas of workflows (api.workflows): a graph of tasks with refs and dependencies, or one of
its two shorthands (a chain, a batch with then / catch / finally), and what a workflow reads as."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from skiplock import workflows
from skiplock.webhooks import targets as callbacks

from .schemas import RestSubmitTaskSchema, check_callback

REF = validate.Regexp(r"^[A-Za-z0-9_.:-]{1,100}$", error="1-100 letters, digits or _.:-")
SHAPES = ("tasks", "chain", "batch")


class WorkflowTaskSchema(RestSubmitTaskSchema):
    """A task of a workflow: the fields of POST /api/tasks but unique_key (a workflow's task is
    its own), with its ref, the refs it depends on and its trigger_rule."""

    class Meta:
        exclude = ("unique_key",)

    ref = fields.String(
        validate=REF, metadata={"description": "Its name in the workflow (required in tasks)."}
    )
    depends_on = fields.List(
        fields.String(validate=REF), metadata={"description": "Refs of the tasks it starts after."}
    )
    trigger_rule = fields.String(
        validate=validate.OneOf(workflows.TRIGGER_RULES),
        metadata={
            "description": "all_succeeded (default): every parent completed; all_done: every parent final "
            "(a finally); any_failed: a parent failed (a catch). When it can no longer hold, the task ends "
            "cancelled, its error naming the parent."
        },
    )

    @post_load
    def prepared(self, data: dict, **kwargs) -> dict[str, Any]:
        """The submit checked as POST /api/tasks checks it, with its place in the graph."""
        graph = {k: data.pop(k) for k in ("ref", "depends_on", "trigger_rule") if k in data}
        return {**graph, "task": super().prepared(data, **kwargs)}


class WorkflowSubmitSchema(Schema):
    name = fields.String(validate=validate.Length(min=1, max=200))
    callback_url = fields.String(
        validate=validate.Length(min=1, max=callbacks.MAX_URL_LENGTH),
        metadata={
            "format": "uri",
            "description": "Gets one signed webhook (workflow.completed, .failed or .cancelled) when every "
            "task is final, as a task's callback_url does.",
        },
    )
    tasks = fields.List(
        fields.Nested(WorkflowTaskSchema),
        validate=validate.Length(min=1, max=workflows.MAX_STEPS),
        metadata={"description": "The graph: each task with its ref and depends_on."},
    )
    chain = fields.List(
        fields.Nested(WorkflowTaskSchema),
        validate=validate.Length(min=1, max=workflows.MAX_STEPS),
        metadata={
            "description": "Instead of tasks: each after the previous one succeeded (refs step-1, ...)."
        },
    )
    batch = fields.List(
        fields.Nested(WorkflowTaskSchema),
        validate=validate.Length(min=1, max=workflows.MAX_STEPS - 3),
        metadata={
            "description": "Instead of tasks: side by side (refs task-1, ...), with then/catch/finally."
        },
    )
    then = fields.Nested(WorkflowTaskSchema, metadata={"description": "batch: after every task succeeded."})
    catch = fields.Nested(WorkflowTaskSchema, metadata={"description": "batch: once a task failed."})
    finally_ = fields.Nested(
        WorkflowTaskSchema, data_key="finally", metadata={"description": "batch: after every task is final."}
    )

    @validates_schema(skip_on_field_errors=True)
    def one_shape(self, data: dict, **kwargs) -> None:
        given = [s for s in SHAPES if s in data]
        if len(given) != 1:
            raise ValidationError("Give exactly one of tasks, chain and batch.", "tasks")
        callbacks_given = [k for k in ("then", "catch", "finally_") if k in data]
        if callbacks_given and given != ["batch"]:
            raise ValidationError("then, catch and finally go with a batch.", callbacks_given[0].rstrip("_"))
        if "callback_url" in data:
            check_callback({"callback_url": data["callback_url"]})
        if "tasks" in data:
            for n, task in enumerate(data["tasks"]):
                if "ref" not in task:
                    raise ValidationError({"tasks": {n: {"ref": ["Each task of a graph needs a ref."]}}})
        shorthand = [*data.get("chain", []), *data.get("batch", [])]
        shorthand += [data[k] for k in callbacks_given]
        for task in shorthand:
            if "ref" in task or "depends_on" in task or "trigger_rule" in task:
                raise ValidationError("A chain or a batch names its own refs and dependencies.", given[0])

    @post_load
    def steps(self, data: dict, **kwargs) -> dict[str, Any]:
        """The workflow as steps (the shorthands expanded), checked as a graph."""
        if "tasks" in data:
            steps = [
                workflows.Step(
                    t["ref"],
                    t["task"],
                    tuple(t.get("depends_on", ())),
                    t.get("trigger_rule", "all_succeeded"),
                )
                for t in data["tasks"]
            ]
        elif "chain" in data:
            steps = workflows.chain([t["task"] for t in data["chain"]])
        else:
            callbacks_ = {k.rstrip("_"): data[k]["task"] for k in ("then", "catch", "finally_") if k in data}
            steps = workflows.batch([t["task"] for t in data["batch"]], callbacks_)
        try:
            graph = workflows.checked(steps)
        except workflows.WorkflowRefused as exc:
            raise ValidationError({"tasks": {exc.where: [str(exc)]}}) from None
        return {"name": data.get("name"), "callback_url": data.get("callback_url"), "graph": graph}


class WorkflowTaskStateSchema(Schema):
    ref = fields.String()
    task_id = fields.Integer(attribute="id")
    status = fields.String()
    task_type = fields.String()
    trigger_rule = fields.String(allow_none=True)
    depends_on = fields.List(fields.String())
    error = fields.String(allow_none=True)


class WorkflowSchema(Schema):
    workflow_id = fields.Integer(attribute="id", required=True)
    name = fields.String(allow_none=True)
    state = fields.String(metadata={"enum": ["running", "completed", "failed", "cancelled"]})
    counts = fields.Dict(
        keys=fields.String(), values=fields.Integer(), metadata={"description": "Tasks by status."}
    )
    tasks = fields.List(fields.Nested(WorkflowTaskStateSchema))
    callback_url = fields.String(allow_none=True)
    created_at = fields.DateTime()
    cancelled_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
