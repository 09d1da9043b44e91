"""`skiplock schedules`: list, show and steer schedules (pause, resume, run now, delete) from the
command line, as /api/schedules does over HTTP; `create` makes one owned by no key (an
operator's: its tasks have no owner), for a key's own use POST /api/schedules."""

from __future__ import annotations

import dataclasses
import json

import click

from skiplock.cli.common import Context, emit, emit_record, fail, json_option
from skiplock.cli.tasks import refusal
from skiplock.schedules import MISSED_POLICIES, OVERLAP_POLICIES, Rule, ScheduleRefused
from skiplock.sql.schedule_fires import schedule_run_now
from skiplock.sql.schedules import (
    schedule_create,
    schedule_delete,
    schedule_get,
    schedule_list,
    schedule_set_paused,
    schedule_view,
    schedules_announce,
)
from skiplock.submission import SubmitRefused, prepare

# Who made or changed a schedule (task_schedules.updated_by, task_schedule_fires.fired_by).
CHANGED_BY = "skiplock-cli"

LIST_COLUMNS = ("id", "name", "source", "owner_key_id", "rule", "timezone", "task_type", "paused", "next_fire_at",
                "last_outcome")  # fmt: skip
SHOW_FIELDS = ("id", "name", "source", "owner_key_id", "rule", "timezone", "task", "missed", "missed_limit",
               "overlap", "grace_seconds", "paused", "next_fire_at", "updated_at", "updated_by")  # fmt: skip
FIRE_COLUMNS = ("scheduled_for", "kind", "outcome", "task_id", "reason", "fired_by")


@click.group("schedules", short_help="Schedules: list, show, create, pause, resume, run, delete.")
def schedules_group() -> None:
    """Schedules: tasks submitted on a clock (cron in a timezone, or every N seconds) by
    whichever worker is up, exactly once per fire time."""


def _rule(row: dict) -> str:
    return row["cron"] if row["cron"] is not None else f"every {row['every_seconds']} s"


@schedules_group.command("list")
@json_option
@click.pass_obj
def list_(ctx: Context) -> None:
    """Every schedule, with its next fire and what its last fire did."""
    with ctx.connect() as conn:
        views = [schedule_view(conn, row, fires=1) for row in schedule_list(conn)]
    if ctx.as_json:
        emit(ctx, views)
        return
    shown = [
        {**v, "rule": _rule(v), "task_type": v["task"]["task_type"],
         "last_outcome": v["last_fires"][0]["outcome"] if v["last_fires"] else None}
        for v in views
    ]  # fmt: skip
    emit(ctx, shown, LIST_COLUMNS)


@schedules_group.command("show")
@click.argument("schedule_id", type=click.IntRange(min=1))
@json_option
@click.pass_obj
def show(ctx: Context, schedule_id: int) -> None:
    """A schedule, its next run times and its last fires."""
    with ctx.connect() as conn:
        view = schedule_view(conn, schedule_get(conn, schedule_id))
    if ctx.as_json:
        emit(ctx, view)
        return
    emit_record(ctx, {**view, "rule": _rule(view), "task": json.dumps(view["task"])}, SHOW_FIELDS)
    for run in view["next_runs"]:
        click.echo(f"next: {run['at'].isoformat()}" + (f"  ({run['note']})" if run["note"] else ""))
    if view["last_fires"]:
        emit(ctx, view["last_fires"], FIRE_COLUMNS)


@schedules_group.command("create")
@click.argument("name")
@click.argument("task_type")
@click.argument("task_input", default="null")
@click.option("--cron", help="5 fields, or 6 with seconds first.")
@click.option(
    "--every", "every_seconds", type=click.IntRange(min=1), help="Every N seconds instead of --cron."
)
@click.option("--timezone", default="UTC", show_default=True, help="IANA timezone of --cron.")
@click.option("--queue", default="default", show_default=True)
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--missed", type=click.Choice(MISSED_POLICIES), default="skip", show_default=True)
@click.option("--overlap", type=click.Choice(OVERLAP_POLICIES), default="allow", show_default=True)
@json_option
@click.pass_obj
def create(ctx: Context, name: str, task_type: str, task_input: str, **options) -> None:
    """Make schedule NAME submitting TASK_TYPE with TASK_INPUT (JSON) at each fire time."""
    try:
        value = json.loads(task_input)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="TASK_INPUT") from None
    try:
        rule = Rule(
            cron=options.pop("cron"),
            every_seconds=options.pop("every_seconds"),
            timezone=options.pop("timezone"),
        )
        task = prepare(ctx.registry(), task_type=task_type, task_input=value,
                       queue=options.pop("queue"), priority=options.pop("priority"))  # fmt: skip
    except ScheduleRefused as exc:
        raise click.BadParameter(str(exc), param_hint=f"--{exc.field.replace('_seconds', '')}") from None
    except SubmitRefused as exc:
        fail(refusal(exc))
    spec = {"task_type": task.task_type, "task_input": task.input, "queue": task.queue, "priority": task.priority,
            "max_attempts": task.max_attempts, "timeout_seconds": task.timeout_seconds}  # fmt: skip
    with ctx.connect() as conn:
        row = schedule_create(conn, name=name, rule=rule, task=spec, by=CHANGED_BY, **options)
        schedules_announce(conn)
    emit_record(ctx, {**row, "rule": _rule(row), "task": json.dumps(row["task"])}, SHOW_FIELDS)


def _set_paused(ctx: Context, schedule_id: int, paused: bool) -> None:
    with ctx.connect() as conn:
        row = schedule_set_paused(conn, schedule_id, paused=paused, by=CHANGED_BY)
        if not paused:
            schedules_announce(conn)
    emit_record(ctx, {**row, "rule": _rule(row), "task": json.dumps(row["task"])}, SHOW_FIELDS)


@schedules_group.command("pause")
@click.argument("schedule_id", type=click.IntRange(min=1))
@json_option
@click.pass_obj
def pause(ctx: Context, schedule_id: int) -> None:
    """Pause a schedule: it fires nothing until resumed."""
    _set_paused(ctx, schedule_id, True)


@schedules_group.command("resume")
@click.argument("schedule_id", type=click.IntRange(min=1))
@json_option
@click.pass_obj
def resume(ctx: Context, schedule_id: int) -> None:
    """Resume a schedule: it fires from its next time after now."""
    _set_paused(ctx, schedule_id, False)


@schedules_group.command("run")
@click.argument("schedule_id", type=click.IntRange(min=1))
@json_option
@click.pass_obj
def run(ctx: Context, schedule_id: int) -> None:
    """Fire a schedule now (its next fire is unchanged); exit 1 if it created nothing, saying why."""
    with ctx.connect() as conn:
        fire = schedule_run_now(conn, schedule_id, by=CHANGED_BY)
    emit_record(
        ctx,
        dataclasses.asdict(fire),
        ("schedule_id", "scheduled_for", "kind", "outcome", "task_id", "reason"),
    )
    if fire.outcome not in ("created", "deduplicated"):
        fail(f"nothing was created: {fire.reason}")


@schedules_group.command("delete")
@click.argument("schedule_id", type=click.IntRange(min=1))
@json_option
@click.pass_obj
def delete(ctx: Context, schedule_id: int) -> None:
    """Delete a schedule and its fires (its tasks stay)."""
    with ctx.connect() as conn:
        schedule_delete(conn, schedule_id)
    emit_record(ctx, {"id": schedule_id, "deleted": True}, ("id", "deleted"))
