"""Signing webhooks per Standard Webhooks (the standardwebhooks library): each owner's secret, the
message id every copy of a delivery carries, and the three headers a receiver verifies."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

# Random bytes in a webhook secret (Standard Webhooks: 24 to 64).
SECRET_BYTES = 32


def new_secret() -> str:
    """A Standard Webhooks secret: whsec_ + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signed_headers(secret: str, message_id: str, body: str) -> dict[str, str]:
    """webhook-id, webhook-timestamp and webhook-signature for this body, signed now."""
    now = datetime.now(UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, now, body),
    }


def message_id(delivery_id: int) -> str:
    return f"msg_{delivery_id}"
