"""Where the database is: DATABASE_URL, or an embedded PostgreSQL for development and tests.

Imported by settings, so it must not import Django models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

EMBEDDED_ADAPTER = "embedded-postgres"
POSTGRES_ADAPTER = "postgres"


def database_url_from_env() -> str:
    return (os.environ.get("DATABASE_URL") or "").strip()


def start_embedded(var_dir: Path) -> str:
    """Start (or attach to) the embedded server under var_dir and return its URL.

    pgserver counts the processes attached to a data directory and stops the server when the
    last of them exits, so a test run or `make run` leaves nothing running behind it. As root it
    runs the server as a dedicated system user, since PostgreSQL refuses to run as root.
    """
    import warnings

    with warnings.catch_warnings():
        # pgserver keeps its lock file in the user runtime dir, which root often lacks; the
        # fallback under /tmp is fine.
        warnings.simplefilter("ignore")
        import pgserver

    var_dir.mkdir(parents=True, exist_ok=True)
    pgdata = var_dir / "pgdata"
    with pgserver.PostgresServer._lock:
        _forget_dead_handles(pgdata)
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    return server.get_uri()


def _forget_dead_handles(pgdata: Path) -> None:
    """pgserver stops the server when the last attached process exits, going by a list of pids
    in the data directory. A process that was killed never takes itself off that list, and then
    the server would never be stopped again: drop the pids that no longer run."""
    import psutil

    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def django_database(url: str, *, pool: bool, adapter: str) -> dict:
    """A Django DATABASES entry from a libpq URL or key=value string."""
    params = conninfo_to_dict(url)
    options: dict[str, object] = {
        key: value for key, value in params.items() if key not in {"dbname", "user", "password", "host", "port"}
    }
    # Parameters travel apart from the SQL, and psycopg prepares statements a connection runs
    # often: less work per query for Python and for the server.
    options.setdefault("server_side_binding", True)
    if pool:
        options["pool"] = {
            "min_size": 1,
            "max_size": int(os.environ.get("AGENTRUN_DB_POOL_SIZE", "16")),
            "timeout": float(os.environ.get("AGENTRUN_DB_POOL_TIMEOUT", "5")),
        }
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.get("dbname") or "postgres",
        "USER": params.get("user") or "postgres",
        "PASSWORD": params.get("password") or "",
        "HOST": params.get("host") or "",
        "PORT": params.get("port") or "",
        "CONN_MAX_AGE": 0 if pool else 60,
        "CONN_HEALTH_CHECKS": not pool,
        "OPTIONS": options,
        "TEST": {"NAME": os.environ.get("AGENTRUN_TEST_DATABASE") or None},
        "AGENTRUN_ADAPTER": adapter,
    }
