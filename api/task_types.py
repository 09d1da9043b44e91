"""The task type catalogue, with the JSON schema of each type's input."""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import Api, Blueprint

from skiplock.registry import TaskType

from .extensions import TaskStore, store
from .schemas import RestSubmitTaskSchema, TaskTypeSchema
from .typed_submit import TypedSubmitPlugin

blp = Blueprint("task_types", __name__, url_prefix="/api", description="What can be submitted.")


def input_json_schema(api: Api, task: TaskType) -> dict:
    converter = api.ma_plugin.converter
    if task.input_schema is not None:
        return converter.schema2jsonschema(task.input_schema)
    return converter.field2property(task.input_field)


def publish_input_schemas(api: Api, task_store: TaskStore, typed_submit: TypedSubmitPlugin) -> None:
    """Put each type's input schema in the OpenAPI document (and the typed REST submit bodies that
    use them), and keep them for GET /api/task-types."""
    catalogue = []
    input_refs = {}
    for task in task_store.registry:
        schema = input_json_schema(api, task)
        api.spec.components.schema(f"TaskInput.{task.name}", component=schema)
        input_refs[task.name] = f"#/components/schemas/TaskInput.{task.name}"
        catalogue.append(
            {
                "name": task.name,
                "description": task.description,
                "timeout_seconds": task.timeout_seconds,
                "max_attempts": task.max_attempts,
                "input_schema": schema,
            }
        )
    task_store.catalogue = catalogue
    typed_submit.add_variants(api.ma_plugin.converter.schema2jsonschema(RestSubmitTaskSchema), input_refs)


@blp.route("/task-types")
class TaskTypes(MethodView):
    @blp.response(200, TaskTypeSchema(many=True))
    def get(self):
        """Every task type this deployment runs, with defaults and the JSON schema of its input."""
        return store().catalogue
