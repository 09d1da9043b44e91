"""API keys, for admin keys: create (the token is shown once), list, revoke. The same as the
`skiplock keys` command, over HTTP."""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import abort

from skiplock import keys
from skiplock.submission import BIGINT_MAX

from .auth import require_admin
from .extensions import Blueprint, db
from .schemas import ApiKeyCreatedSchema, ApiKeyCreateSchema, ApiKeySchema

blp = Blueprint("keys", __name__, url_prefix="/api", description="API keys (admin keys only).")


def forbidden():
    return blp.alt_response(403, response="DEFAULT_ERROR", description="Not an admin key")


@blp.route("/keys")
class Keys(MethodView):
    @blp.response(200, ApiKeySchema(many=True))
    @forbidden()
    def get(self):
        """Every key that is not revoked, oldest first (never their tokens)."""
        require_admin()
        with db() as conn:
            return keys.list_keys(conn)

    @blp.arguments(ApiKeyCreateSchema())
    @blp.response(201, ApiKeyCreatedSchema)
    @forbidden()
    def post(self, data):
        """Create a key; its token is in this answer and nowhere else."""
        require_admin()
        with db() as conn:
            return keys.create_key(conn, **data)


@blp.route(f"/keys/<int(max={BIGINT_MAX}):key_id>/revoke")
class RevokeKey(MethodView):
    @blp.response(200, ApiKeySchema)
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
