"""Webhooks on the worker's hot path: a drain where every task names a callback URL (its final
write also writes the outbox row; the worker's sender process POSTs them, signed, to a local
receiver) next to the same drain without callbacks; and how fast they were delivered. The
receiver is nginx (bench/webhook_sender.py's), as cheap per request as receivers get: a Python
HTTP server in this process cost the drain a core of its own at 2,500 deliveries/s, which was
measuring the receiver, not skiplock."""

from __future__ import annotations

import tempfile
from pathlib import Path

from drain import drain
from harness import ROWS, Databases, Row, cost_row, log, median_and_spread, stop
from webhook_sender import start_receiver


def callback_cost(dbs: Databases, tasks: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="skiplock-bench-hooks-") as work:
        receiver, url, what = start_receiver(Path(work))
        log(f"  receiver: {what}")
        allow = {"SKIPLOCK_WEBHOOK_ALLOW": "127.0.0.1"}  # a loopback receiver must be allowed
        plain, hooked, delivered = [], [], []
        try:
            for round_ in range(rounds):
                log(f"  round {round_ + 1} of {rounds}")
                plain.append(drain(dbs, tasks)[0])
                rate, info = drain(dbs, tasks, callback_url=url, env=allow)
                hooked.append(rate)
                delivered.append(info["delivered_per_second"])
        finally:
            stop(receiver)
    name = f"drain {tasks:,} tasks, each with a callback URL"
    _, plain_rate = cost_row(name, hooked, plain, "tasks/s", "no callbacks", 0.85)
    delivered_rate, delivered_spread = median_and_spread(delivered)
    ratio = delivered_rate / plain_rate
    ROWS.append(
        Row(
            "  their webhooks delivered (signed POST, 204), from the first start",
            f"{delivered_rate:,.0f} deliveries/s ({delivered_spread})",
            f"{plain_rate:,.0f} tasks/s (the drain without callbacks)",
            ratio,
            "-",
            None,
        )
    )
