"""Run a skiplock worker: a supervisor and N task processes claiming from Postgres.

    DATABASE_URL=postgresql://... python worker.py --concurrency 4 --queue default

Every option can also be set in the environment (SKIPLOCK_CONCURRENCY, SKIPLOCK_QUEUES, ...).
Run several of these, on as many hosts as you like, against one database.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from skiplock import logs
from skiplock.settings import Settings
from skiplock.worker.supervisor import Supervisor


def parse_args(argv: list[str], defaults: Settings) -> Settings:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=defaults.concurrency,
        help="task processes (default: CPU count, env SKIPLOCK_CONCURRENCY)",
    )
    parser.add_argument(
        "--queue",
        "-q",
        action="append",
        dest="queues",
        help="claim only from this queue; repeat for several (default: all)",
    )
    parser.add_argument("--lease-seconds", type=float, default=defaults.lease_seconds)
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=defaults.poll_interval_seconds,
        help="seconds between claims when no notification arrives",
    )
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=defaults.shutdown_grace_seconds,
        help="seconds running tasks get to finish on SIGTERM before being handed back",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=defaults.metrics_port,
        help="serve Prometheus metrics on this port (default: off, env SKIPLOCK_METRICS_PORT)",
    )
    parser.add_argument(
        "--metrics-address",
        default=defaults.metrics_address,
        help="address for --metrics-port (default 127.0.0.1, env SKIPLOCK_METRICS_ADDRESS)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logs.configure(args.log_level, defaults.log_format)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if not 0 <= args.metrics_port <= 65535:
        parser.error("--metrics-port must be a port number (0: off)")
    return replace(
        defaults,
        concurrency=args.concurrency,
        queues=tuple(args.queues) if args.queues else defaults.queues,
        lease_seconds=args.lease_seconds,
        poll_interval_seconds=args.poll_interval,
        shutdown_grace_seconds=args.shutdown_grace,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        defaults = Settings.from_env()
    except ValueError as exc:  # a malformed SKIPLOCK_* value: bad usage, as argparse's errors
        print(f"worker.py: {exc}", file=sys.stderr)
        return 2
    settings = parse_args(sys.argv[1:] if argv is None else argv, defaults)
    if not settings.database_url:
        print("worker.py: set DATABASE_URL (or use `make run`, which starts a database)", file=sys.stderr)
        return 2
    if settings.database_pooler:
        print(
            "worker.py: a worker needs a session of its own (LISTEN, advisory locks): point DATABASE_URL "
            "straight at Postgres and leave SKIPLOCK_DATABASE_POOLER unset for workers",
            file=sys.stderr,
        )
        return 2
    supervisor = Supervisor(settings)
    logs.bind(worker_id=supervisor.worker_id)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
