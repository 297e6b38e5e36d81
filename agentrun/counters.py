"""Versions from the one-row counters (see agentrun.models.Counter)."""

from django.db import connection

SESSIONS = "sessions"
QUEUE = "queue"


def next_version(name: str) -> int:
    """The next version of a domain. Call inside the writing transaction: the counter row stays
    locked until that transaction ends, so writers of one domain commit in version order."""
    with connection.cursor() as cursor:
        cursor.execute("UPDATE agentrun_counter SET value = value + 1 WHERE name = %s RETURNING value", [name])
        row = cursor.fetchone()
    if row is None:  # pragma: no cover - the rows are created by migration 0001
        raise RuntimeError(f"version counter {name!r} is missing")
    return row[0]
