"""Fixtures of the webhook tests (test_webhooks.py, test_webhook_process.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.helpers import LOOPBACK, Receiver


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def hook_settings(settings):
    """Loopback allowed (the receiver), fast retries and a short timeout."""
    return replace(
        settings,
        webhook_allow=LOOPBACK,
        webhook_backoff_base_seconds=0.2,
        webhook_backoff_max_seconds=1.0,
        webhook_timeout_seconds=1.0,
    )
