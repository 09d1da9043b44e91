"""The directory where gunicorn's worker processes keep their metrics (prometheus-client's
multiprocess mode: one file per process and metric; /metrics sums them). gunicorn.conf.py makes
it when the server starts (emptying one given in PROMETHEUS_MULTIPROC_DIR, which stale files from
an earlier run would skew), marks dead workers, and removes one it made when it exits."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"
_MADE = "SKIPLOCK_METRICS_DIR_MADE"  # set when the directory is ours to remove


def prepare(log) -> str:
    directory = os.environ.get(ENV)
    if directory:
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(directory, "*.db")):
            os.unlink(stale)
    else:
        directory = tempfile.mkdtemp(prefix="skiplock-metrics-")
        os.environ[ENV] = directory
        os.environ[_MADE] = "1"
    log.info("metrics of the worker processes in %s", directory)
    return directory


def forget_process(pid: int) -> None:
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def remove() -> None:
    directory = os.environ.get(ENV)
    if directory and os.environ.get(_MADE):
        shutil.rmtree(directory, ignore_errors=True)
