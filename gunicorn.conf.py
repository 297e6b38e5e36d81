"""gunicorn as deployed: uvicorn workers (agentrun.server) serving the ASGI application.

Each worker runs Django's views in `AGENTRUN_WEB_THREADS` threads and every waiting request
(SSE streams, `wait=` long-polls) on its event loop, holding no thread (DESIGN: "Serving").
"""

import os

bind = os.environ.get("AGENTRUN_BIND", "127.0.0.1:8000")
worker_class = "agentrun.server.Worker"
workers = int(os.environ.get("AGENTRUN_WEB_WORKERS", "2"))
timeout = 60
graceful_timeout = 10
keepalive = 5
# A burst of connections (streams reconnecting after a restart) waits in the accept queue.
backlog = int(os.environ.get("AGENTRUN_BACKLOG", "4096"))
accesslog = os.environ.get("AGENTRUN_ACCESS_LOG") or None
wsgi_app = "agentrun.asgi:application"
