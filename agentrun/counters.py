"""Versions from the one-row counters (see agentrun.models.Counter)."""

from __future__ import annotations

from django.db import connection
from psycopg import sql

from agentrun.models import Counter
from agentrun.sqlnames import column, table

SESSIONS = "sessions"
QUEUE = "queue"

_NAME, _VALUE = column(Counter, "name"), column(Counter, "value")
# Raw: an upsert that returns the incremented value in one statement; the ORM would need a
# get_or_create, an F() update and a read.
_NEXT = sql.SQL(
    "INSERT INTO {table} ({name}, {value}) VALUES (%s, 1) "
    "ON CONFLICT ({name}) DO UPDATE SET {value} = {table}.{value} + 1 RETURNING {value}"
).format(table=table(Counter), name=_NAME, value=_VALUE)


def next_version(name: str) -> int:
    """The next version of a domain. Call inside the writing transaction: the counter row stays
    locked until that transaction ends, so writers of one domain commit in version order."""
    with connection.cursor() as cursor:
        cursor.execute(_NEXT, [name])
        return cursor.fetchone()[0]


def value_sql(name: str) -> sql.Composed:
    """A scalar subquery for a domain's counter value now, for a statement that must read it in
    one snapshot with its own rows (the inbox reads it with its watermark)."""
    return sql.SQL("SELECT {value} FROM {table} WHERE {name} = {domain}").format(
        value=_VALUE, table=table(Counter), name=_NAME, domain=sql.Literal(name)
    )
