"""How the dashboard's figures read: durations, moments, shares (also the templates' filters,
through views.page_globals)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from markupsafe import Markup

# Durations read in the largest unit that fits, with the next one down: (unit, seconds,
# sub-unit, its seconds).
UNITS = (
    ("d", 86400, "h", 3600),
    ("h", 3600, "min", 60),
    ("min", 60, "s", 1),
)
# Under this many seconds a duration shows a tenth of a second.
TENTHS_BELOW_SECONDS = 10


def seconds_of(value: float | timedelta | None) -> float | None:
    return value.total_seconds() if isinstance(value, timedelta) else value


def duration(seconds: float | timedelta | None) -> str:
    """4.2 s, 3 min 12 s, 2 h 5 min, 3 d 4 h; an em dash for none."""
    seconds = seconds_of(seconds)
    if seconds is None:
        return "—"
    seconds = max(seconds, 0.0)  # two clocks (a session's start, now()) may disagree by a little
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < TENTHS_BELOW_SECONDS else f"{seconds:.0f} s"
    whole = int(seconds)
    for unit, size, sub_unit, sub_size in UNITS:
        if whole >= size:
            return f"{whole // size} {unit} {whole % size // sub_size} {sub_unit}"
    return f"{whole} s"


def ago(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return f"{duration(datetime.now(UTC) - moment)} ago"


def clock(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "—"


def percent(share: float | Decimal | None) -> str:
    return "—" if share is None else f"{float(share) * 100:.1f} %"


def when(moment: datetime | None) -> Markup:
    """A moment as "3 min ago", its exact time on hover and for machines."""
    if moment is None:
        return Markup("—")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        moment.isoformat(), clock(moment), ago(moment)
    )


def ahead(moment: datetime | None) -> Markup:
    """A coming moment as "in 3 min" (or "due now"), its exact time on hover and for machines."""
    if moment is None:
        return Markup("—")
    left = moment - datetime.now(UTC)
    text = f"in {duration(left)}" if left.total_seconds() > 0 else "due now"
    return Markup('<time datetime="{}" title="{}">{}</time>').format(moment.isoformat(), clock(moment), text)
