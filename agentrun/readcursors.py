"""Read cursors (sessions' and queue tasks'): one row per (object, reader), overwritten on each read."""

from __future__ import annotations

from typing import TypeVar

from django.db import connection, models
from psycopg import sql

from agentrun.sqlnames import column, table

Cursor = TypeVar("Cursor", bound=models.Model)


def upsert_read_cursor(
    model: type[Cursor], *, owner_field: str, version_field: str, owner_id: str, reader_id: str, version: int
) -> Cursor:
    """Store that `reader_id` has seen the object at `version`, now (the database's clock), in
    one statement; returns the cursor as a `model` instance (its other fields not loaded)."""
    names = {
        "table": table(model),
        "owner": column(model, owner_field),
        "reader": column(model, "reader_id"),
        "version": column(model, version_field),
        "read_at": column(model, "read_at"),
    }
    # Raw: insert-or-overwrite stamped with the database's clock, returning the row, in one
    # statement; the ORM's update_or_create takes a read and a write, and a race between them.
    statement = sql.SQL(
        "INSERT INTO {table} ({owner}, {reader}, {version}, {read_at}) "
        "VALUES (%s, %s, %s, statement_timestamp()) "
        "ON CONFLICT ({owner}, {reader}) DO UPDATE "
        "SET {version} = EXCLUDED.{version}, {read_at} = EXCLUDED.{read_at} "
        "RETURNING {version}, {read_at}"
    ).format(**names)
    with connection.cursor() as cursor:
        cursor.execute(statement, [owner_id, reader_id, version])
        stored_version, read_at = cursor.fetchone()
    owner = model._meta.get_field(owner_field)
    owner_attname = owner.attname if isinstance(owner, models.Field) else owner_field
    return model(**{owner_attname: owner_id, "reader_id": reader_id, version_field: stored_version, "read_at": read_at})
