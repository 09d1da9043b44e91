"""What both clients are configured with: the key, timeouts, the retry policy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from . import __version__
from .retries import Retry

DEFAULT_TIMEOUT_SECONDS = 10.0
# An event stream sends a heartbeat every 15 s (SKIPLOCK_STREAM_HEARTBEAT_SECONDS): silence this
# long means the connection is dead, and the stream reconnects.
DEFAULT_STREAM_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Options:
    timeout: float
    stream_timeout: float
    retry: Retry

    @classmethod
    def of(cls, timeout: float, stream_timeout: float, retries: int | Retry) -> Options:
        return cls(
            timeout, stream_timeout, retries if isinstance(retries, Retry) else Retry(attempts=retries)
        )

    def request_timeout(self, wait: float) -> httpx.Timeout:
        """A long-poll may be silent for its whole wait: the read timeout comes on top."""
        return httpx.Timeout(self.timeout, read=self.timeout + wait)

    def stream_read_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=self.stream_timeout)


def default_headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": f"skiplock-client/{__version__}", **(extra or {})}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers
