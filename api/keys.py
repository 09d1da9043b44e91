"""API keys, for admin keys: create (the token is shown once; any role of skiplock.keys.ROLES),
list, change a key's weight, revoke. The same as the `skiplock keys` command, over HTTP. A viewer
key may list them (api/auth.py lets it read what an admin reads)."""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import abort

from skiplock import keys
from skiplock.sql.keys import api_key_set_weight
from skiplock.submission import BIGINT_MAX

from .auth import require_admin
from .extensions import Blueprint, db
from .limit_schemas import (
    ApiKeyUpdateSchema,
    WeightedApiKeyCreatedSchema,
    WeightedApiKeyCreateSchema,
    WeightedApiKeySchema,
)

blp = Blueprint(
    "keys", __name__, url_prefix="/api", description="API keys (admin keys; a viewer key may list them)."
)


def forbidden():
    return blp.alt_response(403, response="DEFAULT_ERROR", description="Not an admin key")


@blp.route("/keys")
class Keys(MethodView):
    @blp.response(200, WeightedApiKeySchema(many=True))
    @forbidden()
    def get(self):
        """Every key that is not revoked, oldest first (never their tokens)."""
        require_admin()
        with db() as conn:
            return keys.list_keys(conn)

    @blp.arguments(WeightedApiKeyCreateSchema())
    @blp.response(201, WeightedApiKeyCreatedSchema)
    @forbidden()
    def post(self, data):
        """Create a key; its token is in this answer and nowhere else."""
        require_admin()
        weight = data.pop("weight", None)
        with db() as conn, conn.transaction():
            created = keys.create_key(conn, **data)
            if weight is not None:
                created.update(api_key_set_weight(conn, key_id=created["id"], weight=weight) or {})
            return created


@blp.route(f"/keys/<int(max={BIGINT_MAX}):key_id>")
class Key(MethodView):
    @blp.arguments(ApiKeyUpdateSchema())
    @blp.response(200, WeightedApiKeySchema)
    @forbidden()
    @blp.alt_response(404, response="DEFAULT_ERROR", description="No such key")
    def patch(self, data, key_id):
        """Change a key's weight (its fair share of the workers)."""
        require_admin()
        with db() as conn:
            changed = api_key_set_weight(conn, key_id=key_id, weight=data["weight"])
        if changed is None:
            abort(404, message=f"API key {key_id} does not exist.")
        return changed


@blp.route(f"/keys/<int(max={BIGINT_MAX}):key_id>/revoke")
class RevokeKey(MethodView):
    @blp.response(200, WeightedApiKeySchema)
    @forbidden()
    @blp.alt_response(404, response="DEFAULT_ERROR", description="No such key")
    def post(self, key_id):
        """Revoke a key: every API process refuses it within seconds. Revoking again is a no-op."""
        require_admin()
        with db() as conn:
            revoked = keys.revoke_key(conn, key_id=key_id)
        if revoked is None:
            abort(404, message=f"API key {key_id} does not exist.")
        return revoked
