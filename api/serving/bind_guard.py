"""Auth off is for a local demo: refuse it where others can connect."""

from __future__ import annotations

import ipaddress
import sys

from skiplock.settings import Settings

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(bind: str) -> bool:
    """An address of gunicorn's `bind` that only this machine can reach (a Unix socket counts)."""
    if bind.startswith(("unix:", "fd://")):
        return True
    host = bind.rsplit(":", 1)[0] if bind.count(":") == 1 or bind.startswith("[") else bind
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost, or 0.0.0.0-like: reachable


def refuse_public_bind_without_auth(binds: list[str], log) -> None:
    settings = Settings.from_env()
    if settings.auth_on:
        return
    public = [b for b in binds if not is_loopback(b)]
    if public and not settings.auth_off_on_public_bind:
        log.error(
            "refusing to start: SKIPLOCK_AUTH=off on %s, which other machines can reach. Create an API "
            "key instead (skiplock keys create), bind to 127.0.0.1, or set "
            "SKIPLOCK_AUTH_OFF_ON_PUBLIC_BIND=1 if you really mean it.",
            ", ".join(public),
        )
        sys.exit(3)
    if public:
        log.warning("authentication is OFF on %s (SKIPLOCK_AUTH_OFF_ON_PUBLIC_BIND=1)", ", ".join(public))
    else:
        log.warning("authentication is OFF (SKIPLOCK_AUTH=off): serving only this machine")
