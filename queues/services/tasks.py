"""Writes to queue tasks by their clients and operators: create, attempt updates, cancel, read,
retry; and the helpers the dispatcher's moves share (queues.services.dispatch)."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any
from urllib.parse import quote

from django.db import IntegrityError, transaction

from agentrun import backends, counters, notify, webhooks
from agentrun.auth import Scope
from agentrun.clock import db_now
from agentrun.errors import CANCELLED, SCHEMA_INVALID, AgentRunError, conflict, invalid, not_found
from agentrun.ids import new_id, stable_hash
from agentrun.readcursors import upsert_read_cursor
from agentrun.transactions import write_transaction
from queues.models import TASK_TERMINAL, QueueAttempt, QueueReadCursor, QueueTask, TaskState
from runs import selectors as run_selectors
from runs import services as run_services
from runs.models import RunStatus

logger = logging.getLogger(__name__)
UNRESTRICTED = Scope.unrestricted()

HASHED_FIELDS = (
    "tenant_id",
    "project_id",
    "queue",
    "lane",
    "title",
    "priority",
    "backend_profile",
    "provider_id",
    "workspace_ref",
    "session_ref",
    "execution_policy",
    "resource_bundle_ref",
    "payload",
    "references",
    "metadata",
)
WIRE_NAMES = {
    "webhook_url": "webhookUrl",
    "tenant_id": "tenantId",
    "project_id": "projectId",
    "backend_profile": "backendProfile",
    "provider_id": "providerId",
    "workspace_ref": "workspaceRef",
    "session_ref": "sessionRef",
    "execution_policy": "executionPolicy",
    "resource_bundle_ref": "resourceBundleRef",
}
DEFAULT_MAX_ATTEMPTS = 1
DEFAULT_BACKOFF_SECONDS = 10
DEFAULT_RETRY_ON = ("runner-lost", "infra-failed")
MAX_BACKOFF_SECONDS = 3600
# The run status an attempt ends with, as the task's state (timeout is a failed run).
TASK_STATE_FOR_RUN = {
    RunStatus.COMPLETED: TaskState.COMPLETED,
    RunStatus.FAILED: TaskState.FAILED,
    RunStatus.BLOCKED: TaskState.BLOCKED,
    RunStatus.CANCELLED: TaskState.CANCELLED,
}


def session_path_for(session_ref: dict | None) -> str | None:
    """`/api/v1/sessions/<id>`, percent-encoded as JavaScript's encodeURIComponent (SPEC §3.8)."""
    if not session_ref or not session_ref.get("sessionId"):
        return None
    return "/api/v1/sessions/" + quote(session_ref["sessionId"], safe="!*'()")


def _lock_task(task_id: str, scope: Scope) -> QueueTask:
    task = QueueTask.objects.select_for_update().filter(scope.q(), pk=task_id).first()
    if task is None:
        raise not_found("queue task", task_id)
    return task


def _bump(task: QueueTask, at: datetime, *fields: str) -> None:
    """Save a change of the task (a new queue version); one that ends it sends its webhook."""
    task.version = counters.next_version(counters.QUEUE)
    task.updated_at = at
    task.save(update_fields=[*fields, "version", "updated_at"])
    if "state" in fields and task.state in TASK_TERMINAL and task.webhook_url:
        attempt = task.latest_attempt or {}
        webhooks.enqueue(
            tenant_id=task.tenant_id,
            url=task.webhook_url,
            event_type=webhooks.TASK_ENDED,
            at=at,
            task_id=task.id,
            run_id=attempt.get("runId"),
            data={
                "taskId": task.id,
                "tenantId": task.tenant_id,
                "projectId": task.project_id,
                "queue": task.queue,
                "state": task.state,
                "attemptCount": task.attempt_count,
                "runId": attempt.get("runId"),
                "failureKind": attempt.get("failureKind"),
                "cancelReason": task.cancel_reason,
            },
        )


# --- tasks -----------------------------------------------------------------------------------


@write_transaction(durable=True)
def task_create(*, idempotency_key: str | None = None, **fields: Any) -> tuple[QueueTask, bool]:
    """Put a task in a queue. Returns (task, created). The fields are HASHED_FIELDS (snake_case).

    A key already used by the tenant and project replays its task (whatever its state) when the
    hashed fields match, and is 409 `schema-invalid` when they do not; concurrent creates with
    one key make one task. Errors: 400 for an unknown backend or a malformed ref."""
    backends.require_profile(fields["backend_profile"])
    run_services.validate_session_ref(fields.get("session_ref"))
    bundle_ref = run_services.validate_resource_bundle_ref(fields.get("resource_bundle_ref"))
    workspace_ref = run_services.validate_workspace_ref(fields.get("workspace_ref"))
    # Checked now as its run will be, so a task that names an unknown bundle is refused, not failed later.
    bundle = run_selectors.resource_bundle_for(tenant_id=fields["tenant_id"], resource_bundle_ref=bundle_ref)
    run_selectors.check_workspace_credentials(workspace_ref, bundle)
    values = {name: fields.get(name) for name in HASHED_FIELDS}
    if fields.get("webhook_url"):  # hashed only when given: older tasks' replays keep their hash
        values["webhook_url"] = fields["webhook_url"]
    payload_hash = stable_hash({WIRE_NAMES.get(name, name): value for name, value in values.items()})
    idempotency_key = idempotency_key or None
    if idempotency_key:
        existing = _task_replay(values, idempotency_key, payload_hash)
        if existing is not None:
            return existing, False
    try:
        # A savepoint: losing the key's race undoes the insert, not the replay that follows.
        with transaction.atomic():
            at = db_now()
            task = QueueTask.objects.create(
                id=new_id("qt"),
                **values,
                idempotency_key=idempotency_key,
                payload_hash=payload_hash,
                state=TaskState.PENDING,
                version=counters.next_version(counters.QUEUE),
                session_path=session_path_for(values["session_ref"]),
                created_at=at,
                updated_at=at,
            )
            notify.notify(notify.QUEUE_CHANGED)
            return task, True
    except IntegrityError:
        # A concurrent create with the same key committed first: replay its task.
        existing = _task_replay(values, idempotency_key, payload_hash) if idempotency_key else None
        if existing is None:
            raise
        return existing, False


def _task_replay(values: dict[str, Any], idempotency_key: str, payload_hash: str) -> QueueTask | None:
    existing = QueueTask.objects.filter(
        tenant_id=values["tenant_id"], project_id=values["project_id"], idempotency_key=idempotency_key
    ).first()
    if existing is not None and existing.payload_hash != payload_hash:
        raise conflict(
            SCHEMA_INVALID, "idempotency key reused with a different queue task", idempotencyKey=idempotency_key
        )
    return existing


@write_transaction(durable=True)
def task_attempt_update(
    *,
    task_id: str,
    state: str,
    latest_attempt: dict[str, Any] | None,
    session_path: str | None,
    scope: Scope = UNRESTRICTED,
) -> QueueTask:
    """An operator overwrites the task's state, latest attempt and session path (SPEC §3.8).
    409 on a terminal task: `cancelled` when it was cancelled, else `schema-invalid`."""
    if state not in TaskState.values:
        raise invalid(f"state must be one of {', '.join(TaskState.values)}", field="state")
    task = _lock_task(task_id, scope)
    if task.is_terminal:
        raise conflict(
            CANCELLED if task.state == TaskState.CANCELLED else SCHEMA_INVALID,
            f"queue task {task_id} is already terminal: {task.state}",
            taskId=task_id,
        )
    task.state, task.latest_attempt, task.session_path = state, latest_attempt, session_path
    _bump(task, db_now(), "state", "latest_attempt", "session_path")
    if state == TaskState.PENDING:
        notify.notify(notify.QUEUE_CHANGED)
    return task


@write_transaction(durable=True)
def task_cancel(*, task_id: str, reason: str | None = None, scope: Scope = UNRESTRICTED) -> QueueTask:
    """Cancel a task and, in the same transaction, its attempt's run (or command) (A16). A run
    that is gone counts as ended; a run that had already ended keeps its status as the attempt's
    state. A terminal task is returned unchanged."""
    reason = reason or "cancel requested"
    task = _lock_task(task_id, scope)
    if task.is_terminal:
        return task
    at = db_now()
    attempt_ref = dict(task.latest_attempt) if task.latest_attempt else None
    if attempt_ref is not None:
        attempt_ref["state"] = _cancel_attempt_work(attempt_ref, reason)
        QueueAttempt.objects.filter(task_id=task.id, state=TaskState.RUNNING).update(
            state=attempt_ref["state"], finished_at=at
        )
    task.state, task.latest_attempt = TaskState.CANCELLED, attempt_ref
    task.cancelled_at, task.cancel_reason = at, reason
    _bump(task, at, "state", "latest_attempt", "cancelled_at", "cancel_reason")
    return task


def _cancel_attempt_work(attempt_ref: dict[str, Any], reason: str) -> str:
    """Cancel what the attempt runs; return the attempt's final state."""
    try:
        if attempt_ref.get("runId"):
            run = run_selectors.run_outcomes(run_ids=[attempt_ref["runId"]]).get(attempt_ref["runId"])
            if run is None:
                return TaskState.CANCELLED
            if run.ended:
                return TASK_STATE_FOR_RUN[RunStatus(run.status)]
            run_services.run_cancel_in_transaction(run_id=attempt_ref["runId"], reason=reason)
        elif attempt_ref.get("commandId"):
            command = run_services.command_cancel_in_transaction(command_id=attempt_ref["commandId"], reason=reason)
            return command.state
    except AgentRunError as error:
        if error.status != 404:
            raise
    return TaskState.CANCELLED


@write_transaction(durable=True)
def task_mark_read(*, task_id: str, reader_id: str, scope: Scope) -> QueueReadCursor:
    """The reader has seen the task as it is now. The task itself does not change. 404 for a
    task the key cannot see."""
    task = QueueTask.objects.filter(scope.q(), pk=task_id).only("version").first()
    if task is None:
        raise not_found("queue task", task_id)
    return upsert_read_cursor(
        QueueReadCursor,
        owner_field="task",
        version_field="task_version",
        owner_id=task_id,
        reader_id=reader_id,
        version=task.version,
    )


@write_transaction(durable=True)
def task_retry(*, task_id: str, scope: Scope = UNRESTRICTED) -> QueueTask:
    """An operator sends a failed, blocked or cancelled task back to the queue: the dispatcher
    starts a new attempt as soon as limits allow. 409 for a task that is pending, running or
    completed."""
    task = _lock_task(task_id, scope)
    if task.state not in (TaskState.FAILED, TaskState.BLOCKED, TaskState.CANCELLED):
        raise conflict(
            SCHEMA_INVALID, f"only a failed, blocked or cancelled task can be retried, not {task.state}", taskId=task_id
        )
    task.state, task.not_before, task.cancelled_at, task.cancel_reason = TaskState.PENDING, None, None, None
    _bump(task, db_now(), "state", "not_before", "cancelled_at", "cancel_reason")
    notify.notify(notify.QUEUE_CHANGED)
    return task
