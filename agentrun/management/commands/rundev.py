"""`make run`: migrate, mint development keys, serve the API with gunicorn and run the worker
(with the local launcher) until Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import connection

from agentrun.auth import api_key_create

DEV_TENANT = "dev"
DEV_PROJECT = "demo"


def _database_url() -> str:
    """The URL of the database this process uses, handed to the children so they reuse it
    instead of starting (and later stopping) an embedded server of their own."""
    from psycopg.conninfo import make_conninfo

    db = settings.DATABASES["default"]
    params = {
        "dbname": db["NAME"],
        "user": db["USER"],
        "password": db["PASSWORD"] or None,
        "host": db["HOST"] or None,
        "port": db["PORT"] or None,
    }
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


def _die_with_parent() -> None:
    """In the child: its own process group (a Ctrl-C reaches this command alone, which stops the
    children in order), and if this command dies without stopping it, the child goes too."""
    os.setpgrp()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Command(BaseCommand):
    help = (
        "Development: the server (gunicorn.conf.py) and the worker with the local launcher, on the "
        "embedded or configured PostgreSQL. Ctrl-C stops them all."
    )

    def add_arguments(self, parser):
        parser.add_argument("--bind", default=os.environ.get("AGENTRUN_BIND", "127.0.0.1:8000"))
        parser.add_argument(
            "--launcher", default=os.environ.get("AGENTRUN_LAUNCHER", "local"), choices=["local", "kubernetes", "none"]
        )

    def handle(self, *args, bind, launcher, **options):
        call_command("migrate", interactive=False, verbosity=0)
        _, client_key = api_key_create(tenant_id=DEV_TENANT, project_id=DEV_PROJECT, role="client", name="make run")
        _, runner_key = api_key_create(tenant_id=DEV_TENANT, project_id=DEV_PROJECT, role="runner", name="make run")
        connection.close()
        url = f"http://{bind}"
        env = {
            **os.environ,
            "DATABASE_URL": _database_url(),
            "AGENTRUN_DATABASE_ADAPTER": connection.settings_dict.get("AGENTRUN_ADAPTER", "postgres"),
            "DJANGO_SETTINGS_MODULE": "settings.dev",
            "AGENTRUN_BIND": bind,
            "AGENTRUN_URL": url,
            "AGENTRUN_LAUNCHER": launcher,
            # Logs for a person at a terminal (a deployment's are JSON lines).
            "AGENTRUN_LOG_FORMAT": os.environ.get("AGENTRUN_LOG_FORMAT", "console"),
        }
        children = [
            subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", str(settings.BASE_DIR / "gunicorn.conf.py")],
                env=env,
                preexec_fn=_die_with_parent,
            ),
            subprocess.Popen(
                [sys.executable, str(settings.BASE_DIR / "manage.py"), "worker"], env=env, preexec_fn=_die_with_parent
            ),
        ]
        base = f"{url}/api/v1"
        self.stdout.write(
            f"""
agentrun is serving on {url}  (API docs: {base}/docs/, health: {base}/health)
database: {connection.settings_dict.get("AGENTRUN_ADAPTER")}; worker with the {launcher} launcher

  export AGENTRUN_URL={url}
  export AGENTRUN_KEY={client_key}
  export AGENTRUN_RUNNER_KEY={runner_key}

Send a turn and follow the answer (the worker starts a runner for it):
  .venv/bin/python -m runner.cli run --backend echo --session hello "hello, agent" --follow

The same with curl: create a run and send a turn
  curl -s -X POST {base}/runs -H "Authorization: Bearer $AGENTRUN_KEY" \\
       -H 'Content-Type: application/json' -d '{{"backendProfile": "echo", "sessionRef": {{"sessionId": "hello"}}}}'
  curl -s -X POST {base}/runs/$RUN/commands -H "Authorization: Bearer $AGENTRUN_KEY" \\
       -H 'Content-Type: application/json' -d '{{"type": "turn", "payload": {{"prompt": "hello"}}}}'
then follow its events live (server-sent events; the stream ends with the run):
  curl -N "{base}/runs/$RUN/events/stream" -H "Authorization: Bearer $AGENTRUN_KEY"
and resume after the last id you saw, say 3, with nothing skipped or repeated:
  curl -N "{base}/runs/$RUN/events/stream" -H "Authorization: Bearer $AGENTRUN_KEY" -H 'Last-Event-ID: 3'

Ctrl-C stops everything.
"""
        )
        self.stdout.flush()
        stopping = []

        def stop(signum=None, frame=None):
            stopping.append(True)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            while not stopping and all(child.poll() is None for child in children):
                time.sleep(0.5)
        finally:
            # The worker first (it stops its runners while the server still answers them), then the server.
            for child in reversed(children):
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    child.kill()
