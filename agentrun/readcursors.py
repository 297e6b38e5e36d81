"""Read cursors (sessions' and queue tasks'): one row per (object, reader), overwritten on each read."""

from __future__ import annotations

from django.db import connection


def upsert_read_cursor(model, *, owner_field: str, version_field: str, owner_id: str, reader_id: str, version: int):
    """Store that `reader_id` has seen the object at `version`, now (the database's clock), in
    one statement; returns the cursor as a `model` instance."""
    owner_column = model._meta.get_field(owner_field).column
    version_column = model._meta.get_field(version_field).column
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {model._meta.db_table} ({owner_column}, reader_id, {version_column}, read_at) "
            "VALUES (%s, %s, %s, statement_timestamp()) "
            f"ON CONFLICT ({owner_column}, reader_id) DO UPDATE "
            f"SET {version_column} = EXCLUDED.{version_column}, read_at = EXCLUDED.read_at "
            f"RETURNING {version_column}, read_at",
            [owner_id, reader_id, version],
        )
        stored_version, read_at = cursor.fetchone()
    return model(**{owner_column: owner_id, "reader_id": reader_id, version_field: stored_version, "read_at": read_at})
