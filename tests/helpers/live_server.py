"""Servers on real sockets: gunicorn as deployed (gunicorn.conf.py), on a free loopback port and
the test database, for racing clients, bodies that are too large, long request lines; and the
reference runner in a thread against a server (pytest-django's `live_server`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from django.conf import settings
from django.db import connection
from psycopg.conninfo import make_conninfo

from runner.client import AgentRunClient
from runner.runner import Runner
from tests.helpers.threads import Threads, wait_for

ROOT = Path(settings.BASE_DIR)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def live_database_url() -> str:
    db = connection.settings_dict
    params = {
        "dbname": db["NAME"],
        "user": db["USER"],
        "password": db["PASSWORD"] or None,
        "host": db["HOST"] or None,
        "port": db["PORT"] or None,
    }
    return make_conninfo(**{k: v for k, v in params.items() if v})


@contextlib.contextmanager
def gunicorn(tmp_path: Path, *, workers: int = 2, threads: int = 16, **env):
    """Yields the server's base URL; stops the server on exit."""
    port = free_port()
    process_env = {
        **os.environ,
        "DATABASE_URL": live_database_url(),
        "AGENTRUN_DATABASE_ADAPTER": connection.settings_dict.get("AGENTRUN_ADAPTER", "postgres"),
        "DJANGO_SETTINGS_MODULE": "settings.dev",
        "AGENTRUN_BIND": f"127.0.0.1:{port}",
        "AGENTRUN_WEB_WORKERS": str(workers),
        "AGENTRUN_WEB_THREADS": str(threads),
        "AGENTRUN_VAR_DIR": str(tmp_path / "var"),
        "AGENTRUN_DB_POOL_SIZE": str(threads),
        "AGENTRUN_AUTH_CACHE_SECONDS": "0",
        **env,
    }
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
            cwd=ROOT,
            env=process_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"

        def healthy():
            try:
                return httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            assert wait_for(healthy, 60), log_path.read_text(errors="replace")[-3000:]
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_runner(
    url: str, key: str, run_id: str, workdir: Path, *, transport: httpx.BaseTransport | None = None, **options
) -> tuple[Runner, Threads]:
    """The reference runner for `run_id` in a thread, against the server at `url`, with `key`;
    `Runner` options as given (unless told: a 3 s lease, 0.5 s idle). Its thread's join() gives the
    exit code."""
    options.setdefault("lease_ms", 3000)
    options.setdefault("idle_seconds", 0.5)
    client = AgentRunClient(url, key, transport=transport)
    runner = Runner(client, run_id, workdir=str(workdir), **options)

    def work(_index: int) -> int:
        try:
            return runner.run()
        finally:
            client.close()  # a kept-alive connection would hold a server thread and its database connection

    return runner, Threads(1, work)
