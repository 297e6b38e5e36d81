"""A run's life: create (its session with it), claim, heartbeat, finish, cancel and expire.

Every service locks the run before it looks at it, and a runner's writes are fenced by the
`leaseEpoch` of its claim. `run_create` and `run_cancel` are also steps of the queue's own
transactions (`*_in_transaction`); `run_expire` of the launcher's.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction

from agentrun import backends, notify
from agentrun.auth import Scope
from agentrun.clock import db_now
from agentrun.errors import CANCELLED, RUNNER_LEASE_CONFLICT, SCHEMA_INVALID, conflict
from agentrun.ids import new_id, stable_hash
from agentrun.transactions import durable_service, in_transaction, write_transaction
from runs import selectors
from runs.models import Run, RunStatus
from runs.services._write import (
    DEFAULT_CANCEL_REASON,
    UNRESTRICTED,
    _check_holder,
    _end_run,
    _lock_run,
    _RunWrite,
    _terminal_run_error,
)
from runs.validation import (
    summarize_resource_bundle_ref,
    validate_resource_bundle_ref,
    validate_session_ref,
    validate_workspace_ref,
)
from sessions import services as session_services


@in_transaction
def run_create_in_transaction(
    *,
    tenant_id: str,
    project_id: str,
    backend_profile: str,
    session_ref: dict | None = None,
    resource_bundle_ref: dict | None = None,
    provider_id: str | None = None,
    workspace_ref: Any = None,
    execution_policy: Any = None,
    metadata: Any = None,
    extra: dict | None = None,
    idempotency_key: str | None = None,
    webhook_url: str | None = None,
) -> tuple[Run, bool]:
    """Create a pending run (and its session when the ref names a new one). Returns (run, created).

    Errors: 400 for an unknown backend or a malformed ref; 403 `tenant-policy-denied` / 400 when
    the session belongs to another tenant, project or backend; 409 when the idempotency key was
    used with another input. A repeated key with the same input returns the first run.

    A step of the caller's transaction (the queue's dispatcher); `run_create` opens its own.
    """
    backends.require_profile(backend_profile)
    session_ref = validate_session_ref(session_ref)
    resource_bundle_ref = validate_resource_bundle_ref(resource_bundle_ref)
    workspace_ref = validate_workspace_ref(workspace_ref)
    bundle = selectors.resource_bundle_for(tenant_id=tenant_id, resource_bundle_ref=resource_bundle_ref)
    selectors.check_workspace_credentials(workspace_ref, bundle)
    idempotency_key = idempotency_key or None
    fields = {
        "tenant_id": tenant_id,
        "project_id": project_id,
        "backend_profile": backend_profile,
        "session_ref": session_ref,
        "resource_bundle_ref": resource_bundle_ref,
        "provider_id": provider_id,
        "workspace_ref": workspace_ref,
        "execution_policy": execution_policy,
        "metadata": metadata,
        "extra": extra or {},
    }
    if webhook_url:  # hashed only when given: older runs' replays keep their hash
        fields["webhook_url"] = webhook_url
    payload_hash = stable_hash(dict(fields.items()))
    if idempotency_key:
        existing = _run_replay(tenant_id, project_id, idempotency_key, payload_hash)
        if existing is not None:
            return existing, False
    try:
        # A savepoint: losing the key's race undoes the insert, not the caller's transaction.
        with transaction.atomic():
            # The bundle is not in the hash: a replay is the same input, whatever the default now is.
            fields["resource_bundle"] = bundle.name if bundle is not None else None
            return _run_insert(fields, idempotency_key=idempotency_key, payload_hash=payload_hash), True
    except IntegrityError:
        # A concurrent create with the same key won the unique index: replay its run.
        existing = _run_replay(tenant_id, project_id, idempotency_key, payload_hash) if idempotency_key else None
        if existing is None:
            raise
        return existing, False


run_create = durable_service(run_create_in_transaction)


def _run_replay(tenant_id: str, project_id: str, idempotency_key: str, payload_hash: str) -> Run | None:
    existing = Run.objects.filter(tenant_id=tenant_id, project_id=project_id, idempotency_key=idempotency_key).first()
    if existing is not None and existing.payload_hash != payload_hash:
        raise conflict(
            SCHEMA_INVALID, "idempotency key reused with a different run input", idempotencyKey=idempotency_key
        )
    return existing


def _run_insert(fields: dict, *, idempotency_key: str | None, payload_hash: str) -> Run:
    at = db_now()
    run = Run(
        id=new_id("run"),
        **fields,
        idempotency_key=idempotency_key,
        payload_hash=payload_hash,
        status=RunStatus.PENDING,
        created_at=at,
        updated_at=at,
    )
    if run.session_ref is not None:
        run.session_id = run.session_ref["sessionId"]
        run.session_ref = session_services.session_resolve_for_run(
            session_ref=run.session_ref,
            tenant_id=run.tenant_id,
            project_id=run.project_id,
            backend_profile=run.backend_profile,
            run_id=run.id,
            now=at,
        )
    run.save(force_insert=True)
    run.db_now = at
    write = _RunWrite(run)
    write.emit(
        "backend_status",
        {
            "phase": "run-created",
            "backendProfile": run.backend_profile,
            "sessionRef": session_services.summarize_session_ref(run.session_ref),
            "resourceBundleRef": summarize_resource_bundle_ref(run.resource_bundle_ref),
        },
    )
    write.save()
    notify.notify(notify.RUNS_CREATED)
    if run.session_id:
        notify.notify(notify.session_topic(run.session_id))
    return run


@write_transaction(durable=True)
def run_claim(*, run_id: str, runner_id: str, lease_ms: int, scope: Scope = UNRESTRICTED) -> Run:
    """Claim the run for `runner_id` for `lease_ms`, bumping its lease epoch.

    Allowed when the run is unclaimed, held by the same runner, or its lease has lapsed (SPEC
    §4.2). Errors: 404; 409 (the run's failure kind) when terminal; 409 `runner-lease-conflict`
    when another runner holds a live lease.
    """
    run = _lock_run(run_id, scope)
    if run.is_terminal:
        raise _terminal_run_error(run)
    at = run.db_now
    if run.claimed_by and run.claimed_by != runner_id and run.lease_expires_at and run.lease_expires_at > at:
        raise conflict(RUNNER_LEASE_CONFLICT, f"run {run_id} is already claimed", runId=run_id)
    write = _RunWrite(run)
    write.emit("backend_status", {"phase": "run-claimed", "runnerId": runner_id})
    if run.session_id:
        session_services.session_touch_claimed(session_id=run.session_id, run_id=run.id, at=at)
    write.save(
        status=RunStatus.CLAIMED,
        claimed_by=runner_id,
        claimed_at=at,
        lease_expires_at=at + timedelta(milliseconds=lease_ms),
        lease_epoch=run.lease_epoch + 1,
    )
    return run


@write_transaction(durable=True)
def run_heartbeat(*, run_id: str, runner_id: str, lease_epoch: int, lease_ms: int, scope: Scope = UNRESTRICTED) -> Run:
    """Renew the holder's lease. A terminal run is returned unchanged, whoever asks.
    Errors: 404; 409 `runner-lease-conflict` for anyone but the holder at its current epoch."""
    run = _lock_run(run_id, scope)
    if run.is_terminal:
        return run
    _check_holder(run, runner_id, lease_epoch)
    _RunWrite(run).save(lease_expires_at=run.db_now + timedelta(milliseconds=lease_ms))
    return run


@write_transaction(durable=True)
def run_finish(
    *,
    run_id: str,
    runner_id: str,
    lease_epoch: int,
    terminal_status: str,
    failure_kind: str | None = None,
    failure_message: str | None = None,
    thread_id: str | None = None,
    turn_id: str | None = None,
    scope: Scope = UNRESTRICTED,
) -> Run:
    """The holder ends the run. The first result wins: a terminal run is returned unchanged.
    Open commands are cancelled (`message: "run finished"`), then `terminal_status` is emitted.
    Errors: 404; 409 `runner-lease-conflict` for a stale holder or epoch."""
    run = _lock_run(run_id, scope)
    if run.is_terminal:
        return run
    _check_holder(run, runner_id, lease_epoch)
    return _end_run(
        _RunWrite(run),
        terminal_status=terminal_status,
        failure_kind=failure_kind,
        failure_message=failure_message,
        thread_id=thread_id,
        turn_id=turn_id,
    )


@in_transaction
def run_cancel_in_transaction(*, run_id: str, reason: str | None = None, scope: Scope = UNRESTRICTED) -> Run:
    """Cancel the run and its open commands. A terminal run is returned unchanged. Error: 404.
    A step of the caller's transaction (a queue task's cancel); `run_cancel` opens its own."""
    run = _lock_run(run_id, scope)
    if run.is_terminal:
        return run
    reason = reason or DEFAULT_CANCEL_REASON
    return _end_run(
        _RunWrite(run), terminal_status=CANCELLED, failure_kind=CANCELLED, failure_message=reason, cancel_reason=reason
    )


run_cancel = durable_service(run_cancel_in_transaction)


@in_transaction
def run_expire_in_transaction(*, run_id: str, terminal_status: str, failure_kind: str, message: str) -> Run | None:
    """The reaper ends a run whose runner is gone or whose time is up, bumping the epoch so a
    runner that comes back is fenced out. Returns None when the run is already terminal.

    A step of the caller's transaction (the launcher's, under the run's lock); `run_expire` opens its own.
    """
    run = _lock_run(run_id, UNRESTRICTED)
    if run.is_terminal:
        return None
    write = _RunWrite(run)
    run = _end_run(write, terminal_status=terminal_status, failure_kind=failure_kind, failure_message=message)
    Run.objects.filter(pk=run.pk).update(lease_epoch=run.lease_epoch + 1)
    run.lease_epoch += 1
    return run


run_expire = durable_service(run_expire_in_transaction)
