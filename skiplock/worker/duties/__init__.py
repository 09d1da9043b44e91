"""A worker's background duties, one file each, run from the supervisor's database turn:
leases (renew what it holds), rescuer (take back dead workers' tasks), pruner (retention) and
wakeups (when to claim next)."""
