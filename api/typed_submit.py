"""The REST submit bodies in the OpenAPI document, typed by task type: POST /api/tasks (and each
task of a batch) is a oneOf of one schema per registered type, discriminated by `task_type`, whose
`task_input` is that type's input schema. A client generated from /openapi.json gets a model per
type instead of "any JSON".

An apispec plugin: flask-smorest documents the body from the marshmallow schema; the plugin swaps
it for the oneOf on the operations marked `x-typed-submit` (task, or batch).
"""

from __future__ import annotations

from apispec import APISpec, BasePlugin

from skiplock.submission import MAX_BATCH

VARIANT = "SubmitTask.{}"
UNTYPED = "SubmitTask.untyped"
# Rules between fields the marshmallow schemas check in code, written into their JSON schemas.
SUBMIT_RULES = {
    "allOf": [
        {"not": {"required": ["delay_seconds", "run_at"]}},  # delay_seconds or run_at, not both
        {"not": {"required": ["expires_at", "expires_in_seconds"]}},  # one expiry, not both
        {"not": {"required": ["expires_at", "expires_in_seconds"]}},  # one expiry, not both
        {"anyOf": [{"not": {"required": ["callback_secret"]}}, {"required": ["callback_url"]}]},
    ]
}
RULES = {
    "SubmitTask": SUBMIT_RULES,
    "RestSubmitTask": SUBMIT_RULES,
    "ApiKeyCreate": {"anyOf": [{"not": {"required": ["burst"]}}, {"required": ["rate_per_second"]}]},
}


def one_of(type_names: list[str]) -> dict:
    refs = {name: f"#/components/schemas/{VARIANT.format(name)}" for name in type_names}
    return {
        "oneOf": [{"$ref": ref} for ref in refs.values()],
        "discriminator": {"propertyName": "task_type", "mapping": refs},
    }


class TypedSubmitPlugin(BasePlugin):
    def __init__(self):
        self.type_names: list[str] = []  # the registry's, set before the blueprints are registered

    def init_spec(self, spec: APISpec) -> None:
        self.spec = spec

    def schema_helper(self, name, definition, **kwargs) -> dict | None:
        return RULES.get(name)

    def operation_helper(self, path=None, operations=None, **kwargs) -> None:
        for operation in (operations or {}).values():
            kind = operation.pop("x-typed-submit", None)
            if kind is None:
                continue
            schema = one_of(self.type_names)
            if kind == "original":
                # /api/submit-task: task_type may be left out (the `default` type, any input).
                schema = {"anyOf": [*schema["oneOf"], {"$ref": f"#/components/schemas/{UNTYPED}"}]}
            if kind == "batch":
                schema = {
                    "type": "object",
                    "required": ["tasks"],
                    "additionalProperties": False,
                    "properties": {
                        "tasks": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": schema}
                    },
                }
            operation["requestBody"]["content"]["application/json"]["schema"] = schema

    def add_variants(self, submit_schema: dict, input_refs: dict[str, str]) -> None:
        """One component per task type: the REST submit body (submit_schema, as JSON schema)
        with task_type fixed to the type and task_input its input schema; and the original
        endpoint's body without task_type."""
        for name, input_ref in input_refs.items():
            variant = {**submit_schema, "properties": dict(submit_schema["properties"]), **SUBMIT_RULES}
            variant["properties"]["task_type"] = {"type": "string", "enum": [name]}
            variant["properties"]["task_input"] = {"$ref": input_ref}
            variant["required"] = sorted({*submit_schema.get("required", ()), "task_type", "task_input"})
            self.spec.components.schema(VARIANT.format(name), component=variant)
        untyped = {**submit_schema, "properties": dict(submit_schema["properties"]), **SUBMIT_RULES}
        del untyped["properties"]["task_type"]
        untyped["required"] = ["task_input"]
        untyped["description"] = "Without task_type: the `default` type, whose input is any JSON."
        self.spec.components.schema(UNTYPED, component=untyped)
