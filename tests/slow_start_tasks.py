"""A task module that takes 2 s to import, like one that loads a model or a big library: the
worker's processes are not ready to run anything before that."""

import time

from skiplock.registry import task_type

IMPORT_SECONDS = 2.0
time.sleep(IMPORT_SECONDS)


@task_type("after_slow_import")
def after_slow_import(data, ctx) -> str:
    return "ran"
