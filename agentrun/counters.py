"""Versions from the one-row counters (see agentrun.models.Counter)."""

from django.db import connection

SESSIONS = "sessions"
QUEUE = "queue"


def next_version(name: str) -> int:
    """The next version of a domain. Call inside the writing transaction: the counter row stays
    locked until that transaction ends, so writers of one domain commit in version order."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO agentrun_counter (name, value) VALUES (%s, 1) "
            "ON CONFLICT (name) DO UPDATE SET value = agentrun_counter.value + 1 RETURNING value",
            [name],
        )
        return cursor.fetchone()[0]
