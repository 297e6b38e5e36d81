"""What the benchmarks share: the database server, throwaway databases, manage.py, percentiles."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for agentrun.database when run as a script

MAINTENANCE_DB = "postgres"


class BenchmarkError(Exception):
    """The benchmark could not measure (setup failed, a request failed); not a missed target."""


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def server_url() -> tuple[str, str]:
    """(libpq URL of the server, what it is). The embedded server stays up until we exit."""
    url = (os.environ.get("DATABASE_URL") or "").strip()
    if url:
        return url, "DATABASE_URL"
    from agentrun.database import start_embedded

    return start_embedded(ROOT / "var"), "embedded (var/pgdata)"


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


def describe_server(url: str) -> str:
    params = conninfo_to_dict(url)
    return f"host={params.get('host') or 'localhost'} port={params.get('port') or 5432}"


def drop_database(server: str, name: str) -> None:
    """Drop it from the maintenance database; FORCE ends any session a crash left behind."""
    with psycopg.connect(with_dbname(server, MAINTENANCE_DB), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def recreate_database(server: str, name: str) -> None:
    drop_database(server, name)
    with psycopg.connect(with_dbname(server, MAINTENANCE_DB), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def server_facts(db_url: str) -> dict[str, str]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        facts = {
            name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]
            for name in ("server_version", "max_connections", "synchronous_commit", "shared_buffers")
        }
        facts["connections_in_use"] = str(conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()[0])
    return facts


def manage(db_url: str, *args: str) -> str:
    """Run a management command against the bench database; return its stdout."""
    env = {**os.environ, "DATABASE_URL": db_url, "DJANGO_SETTINGS_MODULE": "settings.dev"}
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    if done.returncode != 0:
        raise BenchmarkError(f"manage.py {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip()


def run_on_fresh_database(name: str, measure: Callable[[str, str, str], None], *, cleanup=None) -> int:
    """Create database `name` on the server, migrate it, call measure(db_url, server, source) and
    drop the database again, whatever happens. 0 when it measured, 1 when it could not."""
    began = time.monotonic()
    server, source = server_url()
    db_url = with_dbname(server, name)
    try:
        recreate_database(server, name)
        print(f"setup: database {name} on {source}: migrate ...", flush=True)
        manage(db_url, "migrate", "--no-input", "-v", "0")
        measure(db_url, server, source)
        print(f"\ntook {time.monotonic() - began:.0f} s")
        return 0
    except (BenchmarkError, psycopg.OperationalError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if cleanup is not None:
            cleanup()
        try:
            drop_database(server, name)
        except psycopg.Error as exc:
            print(f"could not drop database {name}: {exc}", file=sys.stderr)
