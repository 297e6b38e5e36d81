"""The one clock: the database's, so every process (and the lease checks in SQL) agree."""

from __future__ import annotations

from datetime import datetime

from django.db import connection


def db_now() -> datetime:
    """statement_timestamp() on PostgreSQL, like Now() in the lock queries."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        return cursor.fetchone()[0]
