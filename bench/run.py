"""`make bench`: each measure of skiplock next to a baseline measured in the same run.

Starts its own Postgres (embedded; or uses BENCH_DATABASE_URL's server, creating and dropping
its own databases there), gunicorn and worker.py processes. Prints one table (measure, skiplock,
baseline, ratio, target, verdict), writes it with the machine's facts to docs/benchmarks.md, and
plots drain throughput against worker processes and the latency percentiles (docs/*.png).

    python bench/run.py [--quick] [--rounds N] [--scale-rows N] [--only drain,submit,...]

One module per measure (drain, submit, batch, latency, auth, metrics_cost, waiting, webhooks,
webhook_sender, scheduling: fair_drain, limited_drain, unique_submit, starvation; pgqueuer_cost:
PgQueuer as a baseline); harness.py starts what they measure; report.py writes the results.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

import auth
import big_tables
import enqueue_cost
import metrics_cost
import pgqueuer_cost
import schedules
import scheduling
import tracing_cost
import waiting
import webhook_sender
import webhooks
import workflows
from batch import batch_submit
from drain import drain, pgbench_baseline
from harness import DOCS, FACTS, PLOTS, ROWS, Databases, Row, log, median_and_spread, server
from latency import latency
from report import machine_facts, plot, render_table, write_docs
from submit import submit_one_per_request

ALL_MEASURES = (
    "drain",
    "curve",
    "scale",
    "deep_backlog",
    "short_queue",
    "submit",
    "batch",
    "latency",
    "auth",
    "metrics",
    "waiting",
    "webhooks",
    "webhook_sender",
    "fair_drain",
    "limited_drain",
    "unique_submit",
    "starvation",
    "schedules_idle",
    "workflow_chain",
    "workflow_fan_in",
    "tracing",
    "enqueue",
    "pgqueuer",
    "big_tables",
    "prune_drain",
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes, one round, docs left alone (a smoke run: CI)"
    )
    parser.add_argument("--scale-rows", type=int, default=5_000_000)
    parser.add_argument(
        "--big-rows", type=int, default=20_000_000, help="finished tasks in the big_tables measure's table"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="repeats of the drain and submit measures (medians are reported)",
    )
    parser.add_argument(
        "--only",
        default=",".join(ALL_MEASURES),
        help="comma-separated measures to run (default: all); docs are written only for a full run",
    )
    parser.add_argument(
        "--plots",
        action="store_true",
        help="draw the plots of a partial run too (docs/*.png; no benchmarks.md)",
    )
    args = parser.parse_args()
    quick = args.quick
    rounds = 1 if quick else args.rounds
    admin_url, data_root = server("BENCH_DATABASE_URL", "bench")
    dbs = Databases(admin_url)
    started = time.monotonic()
    only = set(args.only.split(","))
    try:
        machine_facts(admin_url)
        drain_tasks = 5_000 if quick else 100_000
        rate = None
        if only & {"drain", "scale"}:
            # Rounds of (pgbench, drain): drift during the run touches both alike; medians count.
            baselines, rates = [], []
            for round_ in range(rounds):
                log(f"pgbench baseline, round {round_ + 1} of {rounds}")
                baselines.append(pgbench_baseline(dbs, 3 if quick else 8))
                log("  drain with default settings")
                drained, info = drain(dbs, drain_tasks)
                rates.append(drained)
                PLOTS.setdefault("timeline", {})[f"{drain_tasks:,} tasks"] = info["timeline"]
                log(f"  {baselines[-1]:,.0f} rows/s (pgbench), {drained:,.0f} tasks/s (skiplock)")
                if round_ == 0:
                    FACTS["worker.py peak RSS"] = (
                        f"supervisor {info['rss'].get('parent', 0):.0f} MiB, task processes up to {info['rss'].get('children_max', 0):.0f} MiB ({info['rss'].get('children', 0)} processes incl. forkserver)"
                    )
            baseline, baseline_spread = median_and_spread(baselines)
            rate, rate_spread = median_and_spread(rates)
            FACTS["drain rounds"] = (
                f"skiplock {rate_spread} tasks/s, pgbench {baseline_spread} rows/s ({rounds} rounds)"
            )
            PLOTS["pgbench"] = baseline
            ratio = rate / baseline
            ROWS.append(
                Row(
                    f"drain {drain_tasks:,} noop tasks (defaults)",
                    f"{rate:,.0f} tasks/s",
                    f"{baseline:,.0f} rows/s (pgbench)",
                    ratio,
                    ">= 95%",
                    ratio >= 0.95,
                )
            )
        if "curve" in only:
            curve = []
            for processes in (1, 2, 4):
                log(f"drain with {processes} processes")
                curve.append((processes, drain(dbs, drain_tasks // 2, processes)[0]))
                log(f"  {curve[-1][1]:,.0f} tasks/s")
            PLOTS["drain"] = curve
        if "scale" in only:
            scale_rows = 50_000 if quick else args.scale_rows
            log(f"drain with {scale_rows:,} finished tasks in the table")
            scaled, info = drain(dbs, drain_tasks, finished_rows=scale_rows)
            ratio = scaled / rate
            ROWS.append(
                Row(
                    f"drain with {scale_rows:,} finished rows",
                    f"{scaled:,.0f} tasks/s",
                    f"{rate:,.0f} tasks/s (empty table)",
                    ratio,
                    ">= 80%",
                    ratio >= 0.8,
                )
            )
            ROWS.append(
                Row(
                    "claim plan on that table",
                    "tasks_runnable_idx" if info["claim_uses_partial_index"] else "NOT the partial index",
                    "-",
                    None,
                    "partial index",
                    info["claim_uses_partial_index"],
                )
            )
        if "deep_backlog" in only:
            deep = 50_000 if quick else 1_000_000
            log(f"drain a backlog of {deep:,} tasks (claims from their last position: no dead head)")
            deep_rate, info = drain(dbs, deep)
            PLOTS.setdefault("timeline", {})[f"{deep:,} tasks"] = info["timeline"]
            shallow = rate if rate is not None else drain(dbs, drain_tasks)[0]
            ratio = deep_rate / shallow
            ROWS.append(
                Row(
                    f"drain a {deep:,}-task backlog",
                    f"{deep_rate:,.0f} tasks/s",
                    f"{shallow:,.0f} tasks/s ({drain_tasks:,}-task backlog)",
                    ratio,
                    ">= 90%",
                    ratio >= 0.9,
                )
            )
        if "short_queue" in only:
            log("drain a short queue (10,000 tasks): how soon it runs at full speed")
            steady = rate if rate is not None else drain(dbs, drain_tasks)[0]
            short_rate, info = drain(dbs, 10_000, timeline_step=0.1)
            at_speed = next((t for t, r in info["timeline"] if r >= 0.9 * steady), None)
            ROWS.append(
                Row(
                    "10,000-task queue: first 0.1 s at >= 90% of full speed",
                    "never"
                    if at_speed is None
                    else f"{at_speed:.1f} s in ({short_rate:,.0f} tasks/s overall)",
                    f"{steady:,.0f} tasks/s ({drain_tasks:,}-task backlog)",
                    None,
                    "< 0.5 s",
                    at_speed is not None and at_speed < 0.5,
                )
            )
        if "submit" in only:
            log("submit, one task per request")
            submit_one_per_request(dbs, 2 if quick else 6, rounds)
        if "batch" in only:
            log("batch submit")
            batch_submit(dbs, 2 if quick else 5)
        if "latency" in only:
            log("latency")
            latency(dbs, 100 if quick else 500)
        if "auth" in only:
            log("submit with a key and its limits, against auth off")
            auth.submit_cost(dbs, 2 if quick else 6, rounds)
            log("submit of a key with a quota (max_unfinished), against one without limits")
            auth.quota_cost(dbs, 2 if quick else 6, rounds)
            log("batch submit with a key and its limits, against auth off")
            auth.batch_cost(dbs, 2 if quick else 5)
            log("one key flooding, another submitting")
            auth.flood_isolation(dbs, 2 if quick else 8)
        if "metrics" in only:
            log("submit with metrics on, against off")
            metrics_cost.submit_cost(dbs, 2 if quick else 6, rounds)
            log("drain with the worker's metrics served and scraped, against not served")
            metrics_cost.drain_cost(dbs, drain_tasks // 2, rounds)
        if "waiting" in only:
            log(f"{waiting.WAITERS:,} long-polls waiting on one API host")
            waiting.long_polls(dbs, 3 if quick else 8)
        if "webhooks" in only:
            log("drain with a callback per task, against none")
            webhooks.callback_cost(dbs, drain_tasks // 2, rounds)
        if "webhook_sender" in only:
            log("one webhook sender process against a local receiver, and the receiver's ceiling")
            webhook_sender.sender_throughput(dbs, 2_000 if quick else 30_000)
        if "fair_drain" in only:
            log(f"drain of {scheduling.OWNERS:,} owners' tasks, against the plain drain")
            scheduling.fair_drain(dbs, drain_tasks, rounds)
        if "limited_drain" in only:
            log(f"drain under {scheduling.CONCURRENCY_KEYS:,} concurrency limits, against the plain drain")
            scheduling.limited_drain(dbs, drain_tasks, rounds)
        if "unique_submit" in only:
            log("submit with a unique_key, against without")
            scheduling.unique_submit(dbs, 2 if quick else 6, rounds)
        if "starvation" in only:
            log("one owner's tasks behind another's backlog")
            scheduling.starvation(dbs, 40_000 if quick else 100_000, 500)
        if "schedules_idle" in only:
            log(f"an idle worker with {schedules.SCHEDULES:,} schedules, against none")
            schedules.idle_cost(dbs, 3 if quick else 30)
        if "workflow_chain" in only:
            log(f"a chain of {workflows.CHAIN_STEPS} steps: from a step's end to the next one's start")
            workflows.chain_latency(dbs, 1 if quick else 3)
        if "workflow_fan_in" in only:
            log("a fan-out and a fan-in on all of it, against the plain drain")
            workflows.fan_in(dbs, 2_000 if quick else 10_000, rounds)
        if "big_tables" in only:
            big_rows = 50_000 if quick else args.big_rows
            log(f"the hot statements with {big_rows:,} finished tasks in the table, against none")
            big_tables.big_table_reads(
                dbs, big_rows, rounds=1 if quick else big_tables.ROUNDS, runs=20 if quick else big_tables.RUNS
            )
        if "prune_drain" in only:
            pruned = 20_000 if quick else 1_000_000
            log(f"a drain while {pruned:,} finished tasks are pruned, against the drain alone")
            big_tables.prune_during_drain(dbs, drain_tasks, pruned, rounds)
        if "tracing" in only:
            log("submit with a traceparent, against without")
            tracing_cost.submit_cost(dbs, 2 if quick else 6, rounds)
        if "enqueue" in only:
            log("enqueue in your own transaction, against a bare INSERT")
            enqueue_cost.enqueue_cost(dbs, 1_000 if quick else 10_000, rounds)
        if "pgqueuer" in only:
            log("enqueue, one task per transaction, against PgQueuer's")
            pgqueuer_cost.enqueue_against_pgqueuer(dbs, 1_000 if quick else 10_000, rounds)
            log(f"drain with {pgqueuer_cost.PROCESSES} processes, against PgQueuer's")
            pgqueuer_cost.drain_against_pgqueuer(dbs, drain_tasks, rounds)
    finally:
        dbs.drop_all()
        if data_root:
            shutil.rmtree(data_root, ignore_errors=True)
    FACTS["bench wall time"] = f"{time.monotonic() - started:.0f} s"
    table = render_table()
    print("\n".join(f"{k}: {v}" for k, v in FACTS.items()))
    print()
    print(table)
    if only == set(ALL_MEASURES) and not quick:  # a smoke run is no record of the machine
        write_docs(plot(), args)
        print(f"\nwritten: {DOCS / 'benchmarks.md'}")
    elif args.plots:
        print(f"\nwritten: {', '.join(plot())} (in {DOCS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
