"""The worker (`skiplock worker`, `python worker.py`): one supervisor process and its task processes.

supervisor.py   the loop: wait, read reports, the database turn, claim, dispatch; shutdown
claimer.py      how many to claim, the claim, the backlog of claimed tasks, dispatching them
duty_turn.py    each turn's database work: session, notifications, leases, rescue, prune
duties/         the background duties, one file each (leases, rescuer, pruner, wakeups)
processes.py    the task processes' reports, deaths and deadlines
slots.py        a process per slot, spawned from a forkserver, killed and replaced
executor.py     the task process itself: runs your function, never touches the database
reports.py      what processes reported, queued for the writer (ReportQueue)
writer.py       the result-writer thread (its own connection) ...
writes.py       ... and the fenced batch statements it writes with
session.py      the supervisor's connections and its liveness lock
batching.py     how much to claim and hand out at once, learnt from task durations
queue_filter.py which queues may be claimed from now (paused ones are not)
stats.py        counters, worker metrics, the task_throughput table
checks.py       the settings a worker refuses to run with
"""
