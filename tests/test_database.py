"""The embedded PostgreSQL's bookkeeping and the DATABASES entry built from a URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from agentrun.database import _forget_dead_handles, django_database


def test_killed_processes_are_dropped_from_the_embedded_servers_handles(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    handles = tmp_path / ".handle_pids.json"
    handles.write_text(json.dumps([os.getpid(), dead.pid]))
    _forget_dead_handles(tmp_path)
    # Otherwise the server would wait forever for the dead process to let go of it.
    assert json.loads(handles.read_text()) == [os.getpid()]


def test_database_entry_from_url_keeps_options_and_adds_the_pool():
    entry = django_database("postgresql://u:p@db.example:6432/app?sslmode=require", pool=True, adapter="postgres")
    assert (entry["NAME"], entry["USER"], entry["PASSWORD"], entry["HOST"], entry["PORT"]) == (
        "app",
        "u",
        "p",
        "db.example",
        "6432",
    )
    assert entry["OPTIONS"]["sslmode"] == "require" and entry["OPTIONS"]["pool"]["max_size"] >= 1
    assert entry["CONN_MAX_AGE"] == 0
    socket_entry = django_database("postgresql://postgres:@/postgres?host=/tmp/sock", pool=False, adapter="x")
    assert socket_entry["HOST"] == "/tmp/sock" and "pool" not in socket_entry["OPTIONS"]
