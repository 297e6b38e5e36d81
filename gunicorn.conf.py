"""gunicorn as deployed: uvicorn workers (agentrun.server) serving the ASGI application.

Each worker runs Django's views in `AGENTRUN_WEB_THREADS` threads and every waiting request
(SSE streams, `wait=` long-polls) on its event loop, holding no thread (DESIGN: "Serving").
"""

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from agentrun.logs import logging_config

bind = os.environ.get("AGENTRUN_BIND", "127.0.0.1:8000")
worker_class = "agentrun.server.Worker"
workers = int(os.environ.get("AGENTRUN_WEB_WORKERS", "2"))
timeout = 60
graceful_timeout = 10
keepalive = 5
# A burst of connections (streams reconnecting after a restart) waits in the accept queue.
backlog = int(os.environ.get("AGENTRUN_BACKLOG", "4096"))
# A line per request (AGENTRUN_ACCESS_LOG: `-` for stderr with the other lines, or a file).
accesslog = os.environ.get("AGENTRUN_ACCESS_LOG") or None
# gunicorn's and uvicorn's lines in agentrun's format (agentrun.logs: JSON, or AGENTRUN_LOG_FORMAT=console).
logconfig_dict = logging_config(access_file=accesslog if accesslog not in (None, "-") else None)
wsgi_app = "agentrun.asgi:application"

# Metrics across the worker processes (agentrun.metrics): each writes its figures to files in
# PROMETHEUS_MULTIPROC_DIR, and /metrics sums them. The directory is made fresh for this master
# (a given one is emptied), before any worker imports prometheus_client.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_metrics_dir_made = not _metrics_dir
if _metrics_dir:
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)
else:
    _metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="agentrun-metrics-")


def child_exit(server, worker):
    """A worker that exited no longer counts in the live gauges (streams, waiters, the pool)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _metrics_dir_made:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
