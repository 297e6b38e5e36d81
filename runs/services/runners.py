"""Runners and runner jobs: a runner's registration (tenant-bound, re-registration keeps its
id), and the record of a runner job (a Kubernetes Job or local process started for a run),
created once per idempotency key and updated by the launcher.

None of these touch a run's row or its events: they use no part of the run write core.
`runner_job_save` is also a step of the launcher's transaction (`runner_job_save_in_transaction`).
"""

from __future__ import annotations

import functools
from typing import Any

from django.db import IntegrityError, connection, transaction
from psycopg import sql
from psycopg.types.json import Jsonb

from agentrun.auth import Scope
from agentrun.clock import db_now
from agentrun.errors import SCHEMA_INVALID, TENANT_POLICY_DENIED, AgentRunError, conflict, not_found
from agentrun.ids import new_id
from agentrun.sqlnames import column, table
from agentrun.transactions import in_transaction, write_transaction
from runs.models import Run, Runner, RunnerJob
from runs.services._write import UNRESTRICTED

_RUNNER_SERVER_FIELDS = {"id", "runnerId", "registeredAt", "heartbeatAt", "tenantId"}


@functools.cache
def _insert_runner_sql() -> sql.Composed:
    runner = {name: column(Runner, name) for name in ("id", "tenant_id", "attributes", "registered_at", "heartbeat_at")}
    return sql.SQL(
        "INSERT INTO {table} ({id}, {tenant_id}, {attributes}, {registered_at}, {heartbeat_at}) "
        "VALUES (%s, %s, %s, %s, %s) ON CONFLICT ({id}) DO NOTHING RETURNING {id}"
    ).format(table=table(Runner), **runner)


@write_transaction(durable=True)
def runner_register(
    *, tenant_id: str, runner_id: str | None = None, attributes: dict | None = None
) -> tuple[Runner, bool]:
    """Register (or re-register) a runner. Returns (runner, created). The caller's fields are
    kept, except the ones the server owns (id, timestamps). Error: 403 when the id belongs to
    another tenant."""
    attributes = {k: v for k, v in (attributes or {}).items() if k not in _RUNNER_SERVER_FIELDS}
    at = db_now()
    if not runner_id:
        runner = Runner.objects.create(
            id=new_id("runner"), tenant_id=tenant_id, attributes=attributes, registered_at=at, heartbeat_at=at
        )
        return runner, True
    params: list[Any] = [runner_id, tenant_id, Jsonb(attributes), at, at]
    # Raw: ON CONFLICT DO NOTHING says whether this call created the row without a unique
    # violation aborting the transaction (the ORM's get_or_create would need a savepoint and a retry).
    with connection.cursor() as cursor:
        cursor.execute(_insert_runner_sql(), params)
        created = cursor.fetchone() is not None
    runner = Runner.objects.select_for_update().get(pk=runner_id)
    if runner.tenant_id != tenant_id:
        raise AgentRunError(
            TENANT_POLICY_DENIED,
            f"runner {runner_id} belongs to another tenant",
            status=403,
            details={"runnerId": runner_id, "valuesPrinted": False},
        )
    if created:
        return runner, True
    Runner.objects.filter(pk=runner_id).update(attributes=attributes, heartbeat_at=at)
    runner.attributes, runner.heartbeat_at = attributes, at
    return runner, False


@write_transaction(durable=True)
def runner_job_save(
    *,
    run_id: str,
    fields: dict,
    job_id: str | None = None,
    idempotency_key: str | None = None,
    scope: Scope = UNRESTRICTED,
) -> tuple[RunnerJob, bool]:
    """Record a runner job for the run. Returns (job, created). A known idempotency key returns
    the first job (same hash) or is 409 `schema-invalid`; a known `job_id` is updated in place.
    Errors: 404 for a run outside the scope; 409 for a job id of another run."""
    return runner_job_save_in_transaction(
        run_id=run_id, fields=fields, job_id=job_id, idempotency_key=idempotency_key, scope=scope
    )


@in_transaction
def runner_job_save_in_transaction(
    *,
    run_id: str,
    fields: dict,
    job_id: str | None = None,
    idempotency_key: str | None = None,
    scope: Scope = UNRESTRICTED,
) -> tuple[RunnerJob, bool]:
    """`runner_job_save` as a step of the caller's transaction (the launcher's, under the run's lock)."""
    idempotency_key = idempotency_key or None
    if not Run.objects.filter(scope.q(run="id"), pk=run_id).exists():
        raise not_found("run", run_id)
    if idempotency_key:
        existing = _runner_job_replay(run_id, idempotency_key, fields["payload_hash"])
        if existing is not None:
            return existing, False
    try:
        # A savepoint: losing the key's race undoes the write, not the caller's transaction.
        with transaction.atomic():
            return _runner_job_write(
                run_id=run_id, fields=fields, job_id=job_id, idempotency_key=idempotency_key, scope=scope
            )
    except IntegrityError:
        existing = _runner_job_replay(run_id, idempotency_key, fields["payload_hash"]) if idempotency_key else None
        if existing is None:
            raise
        return existing, False


@write_transaction(durable=True)
def runner_job_update(*, job_id: str, **fields: Any) -> None:
    """What the launcher learnt of a job it started (namespace, name, image, result)."""
    RunnerJob.objects.filter(pk=job_id).update(**fields, updated_at=db_now())


def _runner_job_replay(run_id: str, idempotency_key: str, payload_hash: str) -> RunnerJob | None:
    existing = RunnerJob.objects.filter(run_id=run_id, idempotency_key=idempotency_key).first()
    if existing is not None and existing.payload_hash != payload_hash:
        raise conflict(
            SCHEMA_INVALID, "runner job idempotency key reused with a different payload", idempotencyKey=idempotency_key
        )
    return existing


def _runner_job_write(
    *, run_id: str, fields: dict, job_id: str | None, idempotency_key: str | None, scope: Scope
) -> tuple[RunnerJob, bool]:
    at = db_now()
    if job_id:
        existing = RunnerJob.objects.select_for_update().filter(pk=job_id).first()
        if existing is not None:
            if existing.run_id != run_id:
                # Only a caller who may see that other run learns the job is there.
                if not Run.objects.filter(scope.q(run="id"), pk=existing.run_id).exists():
                    raise not_found("runner job", job_id)
                raise conflict(SCHEMA_INVALID, f"runner job {job_id} belongs to another run", runnerJobId=job_id)
            RunnerJob.objects.filter(pk=job_id).update(**fields, idempotency_key=idempotency_key, updated_at=at)
            existing.refresh_from_db()
            return existing, False
    job = RunnerJob(
        id=job_id or new_id("rjob"),
        run_id=run_id,
        idempotency_key=idempotency_key,
        created_at=at,
        updated_at=at,
        **fields,
    )
    job.save(force_insert=True)
    return job, True
