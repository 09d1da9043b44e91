"""What only gunicorn needs: its settings and hooks, its logger class, the bind guard, and the
prometheus-client directory its processes share."""
