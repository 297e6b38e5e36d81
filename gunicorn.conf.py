"""gunicorn as deployed: gthread workers, so long-polls wait on a thread, not a whole worker."""

import os

bind = os.environ.get("AGENTRUN_BIND", "127.0.0.1:8000")
worker_class = "gthread"
workers = int(os.environ.get("AGENTRUN_WEB_WORKERS", "2"))
# A long-poll holds its thread (not a database connection) for up to 30 s.
threads = int(os.environ.get("AGENTRUN_WEB_THREADS", "64"))
timeout = 60
graceful_timeout = 10
keepalive = 5
# Request lines up to 8 KiB reach the API (long query strings: ids, reader ids, tokens); the
# API answers an over-long parameter in its own envelope.
limit_request_line = 8190
accesslog = os.environ.get("AGENTRUN_ACCESS_LOG") or None
wsgi_app = "agentrun.wsgi:application"
