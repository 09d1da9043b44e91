"""Schedules' rules, once: what a cron expression or an interval means, when a schedule fires
next, and which fire times a round fires, records as missed or catches up (its `missed` policy).
Pure Python on times the caller reads from the database's clock (now()), so every host decides
the same way whatever its own clock says. The SQL that fires is skiplock/sql/schedules.py.

- cron: 5 fields (minute hour day month weekday), or 6 with seconds first, read by croniter
  (pallets-eco/croniter: ranges, steps, names, L, #) in the schedule's IANA timezone.
- every_seconds: fires at the multiples of the interval since the Unix epoch (UTC), so every
  host and every restart agrees on them (every 30 s: at :00 and :30).
- Daylight saving time: a fire time the day skips (02:30 when clocks go from 02:00 to 03:00)
  runs at the first moment after the gap (03:00); a time the day repeats (01:30 when clocks go
  back) runs once, at its first occurrence, when the hour is fixed (hour field without * or /);
  rules that run every hour or more often run in both passes of the repeated hour.
- A fire is on time if it is made within `grace_seconds` of its time (default: 60 s, or the gap
  to the next fire time when that is shorter, so a schedule every second is never made twice in
  one go by default); later fire times are missed: `skip` records them, `run_once` runs the
  latest of them once, `run_all` runs each of the most recent `missed_limit` of them.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

MISSED_POLICIES = ("skip", "run_once", "run_all")
OVERLAP_POLICIES = ("allow", "skip")
DEFAULT_GRACE_SECONDS = 60
DEFAULT_MISSED_LIMIT = 100
MAX_MISSED_LIMIT = 10_000
MAX_EVERY_SECONDS = 366 * 24 * 3600
# Fire times enumerated in one round at most: beyond it, missed fires are counted no further
# (a schedule every second that no host fired for a day has 86,400; croniter takes ~0.1 ms each).
MAX_ENUMERATED = 1_000
# Fire times GET /api/schedules/{id} shows ahead.
NEXT_RUNS_SHOWN = 5

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ScheduleRefused(ValueError):
    """A rule that cannot be used; `field` names the part at fault."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Rule:
    """When a schedule fires: a cron expression in a timezone, or an interval."""

    cron: str | None = None
    every_seconds: int | None = None
    timezone: str = "UTC"

    def __post_init__(self):
        if (self.cron is None) == (self.every_seconds is None):
            raise ScheduleRefused("Give either cron or every_seconds (exactly one).", "cron")
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ScheduleRefused(
                f"Unknown timezone {self.timezone!r}: use an IANA name such as UTC or Europe/Paris.",
                "timezone",
            ) from None
        object.__setattr__(self, "_zone", zone)
        if self.every_seconds is not None:
            if not 1 <= self.every_seconds <= MAX_EVERY_SECONDS:
                raise ScheduleRefused(f"every_seconds must be 1 to {MAX_EVERY_SECONDS}.", "every_seconds")
            return
        assert self.cron is not None
        fields_ = self.cron.split()
        if len(fields_) not in (5, 6):
            raise ScheduleRefused(
                f"A cron expression has 5 fields (minute hour day month weekday), or 6 with seconds "
                f"first; {self.cron!r} has {len(fields_)}.",
                "cron",
            )
        try:
            croniter(self.cron, datetime.now(UTC), second_at_beginning=len(fields_) == 6)
        except (CroniterError, ValueError, KeyError) as exc:
            raise ScheduleRefused(f"Invalid cron expression {self.cron!r}: {exc}", "cron") from None

    @property
    def zone(self) -> ZoneInfo:
        return self._zone  # type: ignore[attr-defined]

    @property
    def _with_seconds(self) -> bool:
        return self.cron is not None and len(self.cron.split()) == 6

    @property
    def _fixed_hour(self) -> bool:
        """A cron whose hour field names hours (no * or /): it runs once in a repeated hour."""
        assert self.cron is not None
        hour = self.cron.split()[2 if self._with_seconds else 1]
        return "*" not in hour and "/" not in hour

    def next_after(self, when: datetime) -> datetime:
        """The first fire time strictly after `when` (aware datetimes; UTC out)."""
        if self.every_seconds is not None:
            elapsed = (when - _EPOCH) // timedelta(seconds=1)
            return _EPOCH + timedelta(seconds=(elapsed // self.every_seconds + 1) * self.every_seconds)
        assert self.cron is not None
        local = when.astimezone(self.zone)
        times = croniter(self.cron, local, second_at_beginning=self._with_seconds)
        while True:
            fire: datetime = times.get_next(datetime)
            # The second pass of a repeated hour (fold 1) of a fixed-hour rule ran in the first.
            if not (fire.fold == 1 and self._fixed_hour):
                return fire.astimezone(UTC)

    def upcoming(self, after: datetime, count: int = NEXT_RUNS_SHOWN) -> list[datetime]:
        times, at = [], after
        for _ in range(count):
            at = self.next_after(at)
            times.append(at)
        return times

    def note(self, fire: datetime) -> str | None:
        """What a fire time does that its rule does not say: a time a daylight saving gap skips."""
        if self.cron is None:
            return None
        local = fire.astimezone(self.zone)
        if croniter.match(self.cron, local.replace(tzinfo=None), second_at_beginning=self._with_seconds):
            return None
        return (
            f"the rule's time does not exist on {local:%Y-%m-%d} in {self.timezone} (daylight saving "
            f"time starts): it runs at {local:%H:%M:%S}, the first moment after the gap"
        )


@dataclass(frozen=True)
class Policy:
    missed: str = "skip"
    missed_limit: int = DEFAULT_MISSED_LIMIT
    grace_seconds: int | None = None  # None: DEFAULT_GRACE_SECONDS, or the gap to the next fire if shorter

    def grace(self, fire: datetime, following: datetime) -> float:
        """How late the fire at `fire` may be made and still be on time."""
        if self.grace_seconds is not None:
            return self.grace_seconds
        return min(DEFAULT_GRACE_SECONDS, (following - fire).total_seconds())


@dataclass
class Round:
    """What one round does for a due schedule."""

    fire: list[tuple[datetime, str]] = field(default_factory=list)  # (time, kind: on_time | catch_up)
    missed: int = 0  # fire times recorded as missed, not run
    missed_from: datetime | None = None
    missed_until: datetime | None = None
    counted_all: bool = True  # False: missed is a lower bound (more than MAX_ENUMERATED were due)
    next_fire_at: datetime | None = None


def plan_round(rule: Rule, policy: Policy, next_fire_at: datetime, now: datetime) -> Round:
    """The fires of a schedule due since `next_fire_at` (<= now), on the database's `now`: the
    due times still within their grace (on time), the missed ones its policy catches up, and
    the rest recorded as missed."""
    plan = Round()
    on_time: list[datetime] = []
    missed: collections.deque[datetime] = collections.deque(maxlen=policy.missed_limit)
    dropped = 0  # missed times pushed out of `missed`: not run whatever the policy
    last_dropped: datetime | None = None
    due, at = 0, next_fire_at
    while at <= now:
        following = rule.next_after(at)
        if due == MAX_ENUMERATED and plan.counted_all:
            # Too many to walk: those up to the last few before now are missed, uncounted.
            plan.counted_all = False
            window = (following - at) * (policy.missed_limit + 1) + timedelta(
                seconds=policy.grace_seconds or DEFAULT_GRACE_SECONDS
            )
            resume = rule.next_after(now - window)
            if resume > at:
                dropped += len(missed) + 1
                last_dropped = at
                missed.clear()
                at = resume
                continue
        due += 1
        if (now - at).total_seconds() <= policy.grace(at, following) and len(on_time) < MAX_ENUMERATED:
            on_time.append(at)
        else:
            if len(missed) == missed.maxlen:
                dropped += 1
                last_dropped = missed[0]
            missed.append(at)
        at = following
    plan.next_fire_at = at
    late = list(missed)
    catch_up: list[datetime] = []
    if policy.missed == "run_once":
        catch_up = late[-1:]
    elif policy.missed == "run_all":
        catch_up = late
    skipped = late[: len(late) - len(catch_up)]
    plan.fire = [(t, "catch_up") for t in catch_up] + [(t, "on_time") for t in on_time]
    plan.missed = dropped + len(skipped)
    if plan.missed:
        plan.missed_from = next_fire_at
        plan.missed_until = skipped[-1] if skipped else last_dropped
    return plan
