"""Server-sent events (text/event-stream), parsed line by line as the HTML standard says: fields
`event`, `data` (lines joined with newlines), `id` and `retry`; comments (heartbeats) skipped; an
event ends at a blank line."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RawEvent:
    event: str
    data: str
    id: str | None


class EventParser:
    """Feed it the stream's lines; it hands back each complete event. `last_id` is the id to
    resume from (Last-Event-ID), `retry_ms` the reconnection delay the server asked for."""

    def __init__(self, last_id: str | None = None) -> None:
        self.last_id = last_id
        self.retry_ms: int | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> RawEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> RawEvent | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:
            return None
        return RawEvent(event, "\n".join(data), self.last_id)
