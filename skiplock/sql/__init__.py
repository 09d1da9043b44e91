"""Every SQL statement skiplock runs, and nothing else (the DDL is schema.sql, shipped beside these
modules). One module per table family; each function takes an open connection, runs one short
statement and returns typed rows:

    tasks.py       tasks as clients see them: submit, read, list, cancel, retry, attempts
    claim.py       the claim (FOR UPDATE SKIP LOCKED, in priority order) and the next due time
    fenced.py      a worker's writes to what it holds, fenced on (id, attempt, worker, processing)
    workers.py     the worker registry, dead workers' tasks rescued, idle workers' wake-ups
    keys.py        API keys, rate buckets, quotas, Idempotency-Keys
    operations.py  queues, health, failures, throughput, retention: what operators read and steer
    watchers.py    clients waiting on tasks (long-polls, event streams)
    webhooks.py    the webhook outbox: deliveries, attempts, secrets
    fragments.py   pieces several statements share (NOTIFY channels, the announce and outbox
                   CTEs, final statuses, a client's columns): one definition, so no copy drifts
    rows.py        the connection type and the row helpers the modules share
"""
