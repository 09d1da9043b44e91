"""Imported first in a worker's forkserver (multiprocessing's preload), for its side effect: the
forkserver, and every task process it forks, ignore SIGTERM and SIGINT.

Service managers (systemd's default KillMode=control-group) and a terminal's Ctrl-C signal the
whole process group, not only the supervisor. Only the supervisor decides what stops: it lets
running tasks finish within the grace period and hands back the rest, then kills its processes
with SIGKILL. A forkserver killed by SIGTERM would instead take every task process with it
(they die with their parent) and lose their exit status. Never import this anywhere else.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
