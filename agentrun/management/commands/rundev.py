"""`make run`: migrate, mint development keys, serve the API with gunicorn until Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
    params = {"dbname": db["NAME"], "user": db["USER"], "password": db["PASSWORD"] or None,
              "host": db["HOST"] or None, "port": db["PORT"] or None}
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


def _die_with_parent() -> None:
    """In the child: if this command dies without stopping it, the server goes too (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Command(BaseCommand):
    help = "Development server: gunicorn (gthread) on the embedded or configured PostgreSQL."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default=os.environ.get("AGENTRUN_BIND", "127.0.0.1:8000"))

    def handle(self, *args, bind, **options):
        call_command("migrate", interactive=False, verbosity=0)
        _, client_key = api_key_create(tenant_id=DEV_TENANT, project_id=DEV_PROJECT, role="client", name="make run")
        _, runner_key = api_key_create(tenant_id=DEV_TENANT, project_id=DEV_PROJECT, role="runner", name="make run")
        connection.close()
        env = {
            **os.environ,
            "DATABASE_URL": _database_url(),
            "AGENTRUN_DATABASE_ADAPTER": connection.settings_dict.get("AGENTRUN_ADAPTER", "postgres"),
            "DJANGO_SETTINGS_MODULE": "settings.dev",
            "AGENTRUN_BIND": bind,
        }
        web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(settings.BASE_DIR / "gunicorn.conf.py")],
            env=env,
            preexec_fn=_die_with_parent,
        )
        base = f"http://{bind}/api/v1"
        self.stdout.write(
            f"""
agentrun is serving on http://{bind}  (API docs: {base}/docs/, health: {base}/health)
database: {connection.settings_dict.get("AGENTRUN_ADAPTER")}

  export AGENTRUN_KEY={client_key}
  export AGENTRUN_RUNNER_KEY={runner_key}

Create a run:
  curl -s -X POST {base}/runs -H "Authorization: Bearer $AGENTRUN_KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{{"backendProfile": "echo", "sessionRef": {{"sessionId": "hello"}}}}'

Claim it as a runner (put the run id in RUN):
  curl -s -X POST {base}/runs/$RUN/claim -H "Authorization: Bearer $AGENTRUN_RUNNER_KEY" \\
       -H 'Content-Type: application/json' -d '{{"runnerId": "me", "leaseMs": 60000}}'

Follow its events (waits up to 30 s for new ones):
  curl -s "{base}/runs/$RUN/events?afterSeq=0&wait=30" -H "Authorization: Bearer $AGENTRUN_KEY"

Ctrl-C stops everything.
"""
        )
        self.stdout.flush()

        def stop(signum, frame):
            web.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        try:
            web.wait()
        except KeyboardInterrupt:
            web.send_signal(signal.SIGTERM)
            web.wait(timeout=15)
