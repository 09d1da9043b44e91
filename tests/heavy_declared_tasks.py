"""A declaration module, as docs/heavy-tasks.md has users write one: the task types' names and input
schemas, light to import. The API, the supervisor and the forkserver import this module only; the
functions live in tests.heavy_impl_tasks (which refuses to be imported anywhere but a task process)."""

from marshmallow import Schema, fields, validate

from skiplock.registry import task_type


class EmbedInput(Schema):
    text = fields.String(required=True, validate=validate.Length(min=1))


class AllocateInput(Schema):
    mb = fields.Integer(required=True, validate=validate.Range(min=0, max=1024))


task_type("heavy_embed", input=EmbedInput, run="tests.heavy_impl_tasks:embed", timeout_seconds=30)
task_type("heavy_allocate", input=AllocateInput, run="tests.heavy_impl_tasks:allocate", timeout_seconds=30)


@task_type("sized_result", input=fields.Integer(required=True))
def sized_result(size: int, ctx) -> str:
    """A result of `size` characters (its JSON is size + 2 bytes)."""
    return "x" * size
