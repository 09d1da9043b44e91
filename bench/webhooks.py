"""Webhooks on the worker's hot path: a drain where every task names a callback URL (its final
write also writes the outbox row; the worker's sender thread POSTs them, signed, to a receiver
in this process) next to the same drain without callbacks; and how fast they were delivered."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from drain import drain
from harness import ROWS, Databases, Row, cost_row, log, median_and_spread


class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # one line per delivery would swamp the bench's output
        pass


def callback_cost(dbs: Databases, tasks: int, rounds: int) -> None:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_port}/hook"
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
        receiver.shutdown()
    name = f"drain {tasks:,} tasks, each with a callback URL"
    _, plain_rate = cost_row(name, hooked, plain, "tasks/s", "no callbacks", 0.8)
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
