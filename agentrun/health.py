"""Store health (SPEC §1.8): is the database reachable, and are its migrations applied?"""

from __future__ import annotations

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

from agentrun.middleware import missing_database_error

# Once every migration is applied, the code of this process cannot need more: skip the (slow)
# migration graph on later calls and only check that the database answers.
_migrated: dict[str, str | None] = {}


def store_health() -> tuple[dict, int]:
    """The StoreHealth record and its HTTP status (200 when ready, else 503)."""
    if getattr(settings, "AGENTRUN_DATABASE_MISSING", False):
        message, details = missing_database_error()
        record = _record("postgres", reachable=False, migration_ready=False, migration_id=None, message=message)
        record["details"] = details
        return record, 503
    connection = connections[DEFAULT_DB_ALIAS]
    adapter = connection.settings_dict.get("AGENTRUN_ADAPTER", "postgres")
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:  # noqa: BLE001 - any failure to reach the database is "not reachable"
        return _record(
            adapter, reachable=False, migration_ready=False, migration_id=None, message="the database is not reachable"
        ), 503
    if connection.settings_dict["NAME"] in _migrated:
        latest = _migrated[connection.settings_dict["NAME"]]
        return _record(adapter, reachable=True, migration_ready=True, migration_id=latest, message=None), 200
    try:
        from django.db.migrations.executor import MigrationExecutor

        executor = MigrationExecutor(connection)
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
        applied = executor.loader.applied_migrations
        latest = None
        if applied:
            with connection.cursor() as cursor:
                cursor.execute("SELECT app, name FROM django_migrations ORDER BY applied DESC, id DESC LIMIT 1")
                row = cursor.fetchone()
            latest = f"{row[0]}.{row[1]}" if row else None
    except Exception:  # noqa: BLE001
        return _record(
            adapter,
            reachable=True,
            migration_ready=False,
            migration_id=None,
            message="the migration state could not be read",
        ), 503
    if pending:
        return _record(
            adapter,
            reachable=True,
            migration_ready=False,
            migration_id=latest,
            message=f"{len(pending)} migrations are not applied",
        ), 503
    _migrated[connection.settings_dict["NAME"]] = latest
    return _record(adapter, reachable=True, migration_ready=True, migration_id=latest, message=None), 200


def _record(
    adapter: str, *, reachable: bool, migration_ready: bool, migration_id: str | None, message: str | None
) -> dict:
    ready = reachable and migration_ready
    return {
        "adapter": adapter,
        "ready": ready,
        "reachable": reachable,
        "migrationReady": migration_ready,
        "migrationId": migration_id,
        "failureKind": None if ready else "infra-failed",
        "message": message,
        "credentialValuesPrinted": False,
    }
