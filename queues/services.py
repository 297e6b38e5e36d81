"""Every write to queue tasks: create, attempt updates, cancel, read, retry, and the dispatcher's
two moves: turn a pending task into a run (dispatch) and follow the run to its end (settle).

Locks, in the one order every app keeps: queue task, then (through runs' services) run,
command, session, the session version counter; then the queue version counter last. The
dispatcher also takes two advisory locks after the task (its queue's, then its tenant's), so
dispatchers count running attempts one at a time per queue and per tenant.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import quote

from django.db import IntegrityError, connection, transaction

from agentrun import backends, counters, notify
from agentrun.auth import Scope
from agentrun.clock import db_now
from agentrun.errors import CANCELLED, SCHEMA_INVALID, AgentRunError, conflict, invalid, not_found
from agentrun.ids import new_id, stable_hash
from agentrun.readcursors import upsert_read_cursor
from agentrun.transactions import write_transaction
from queues.models import QueueAttempt, QueueReadCursor, QueueTask, TaskState
from runs import services as run_services
from runs.models import RUN_TERMINAL, Run, RunStatus

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
    task.version = counters.next_version(counters.QUEUE)
    task.updated_at = at
    task.save(update_fields=[*fields, "version", "updated_at"])


# --- tasks -----------------------------------------------------------------------------------


def task_create(*, idempotency_key: str | None = None, **fields) -> tuple[QueueTask, bool]:
    """Put a task in a queue. Returns (task, created). The fields are HASHED_FIELDS (snake_case).

    A key already used by the tenant and project replays its task (whatever its state) when the
    hashed fields match, and is 409 `schema-invalid` when they do not; concurrent creates with
    one key make one task. Errors: 400 for an unknown backend or a malformed ref."""
    backends.require_profile(fields["backend_profile"])
    run_services.validate_session_ref(fields.get("session_ref"))
    run_services.validate_resource_bundle_ref(fields.get("resource_bundle_ref"))
    values = {name: fields.get(name) for name in HASHED_FIELDS}
    payload_hash = stable_hash({WIRE_NAMES.get(name, name): value for name, value in values.items()})
    idempotency_key = idempotency_key or None
    with transaction.atomic():
        if idempotency_key:
            existing = _task_replay(values, idempotency_key, payload_hash)
            if existing is not None:
                return existing, False
        try:
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


def _task_replay(values: dict, idempotency_key: str, payload_hash: str) -> QueueTask | None:
    existing = QueueTask.objects.filter(
        tenant_id=values["tenant_id"], project_id=values["project_id"], idempotency_key=idempotency_key
    ).first()
    if existing is not None and existing.payload_hash != payload_hash:
        raise conflict(
            SCHEMA_INVALID, "idempotency key reused with a different queue task", idempotencyKey=idempotency_key
        )
    return existing


@write_transaction
def task_attempt_update(
    *, task_id: str, state: str, latest_attempt: dict | None, session_path: str | None, scope: Scope = UNRESTRICTED
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


@write_transaction
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


def _cancel_attempt_work(attempt_ref: dict, reason: str) -> str:
    """Cancel what the attempt runs; return the attempt's final state."""
    try:
        if attempt_ref.get("runId"):
            run = Run.objects.filter(pk=attempt_ref["runId"]).only("status").first()
            if run is None:
                return TaskState.CANCELLED
            if run.status in RUN_TERMINAL:
                return TASK_STATE_FOR_RUN[run.status]
            run_services.run_cancel(run_id=attempt_ref["runId"], reason=reason)
        elif attempt_ref.get("commandId"):
            command = run_services.command_cancel(command_id=attempt_ref["commandId"], reason=reason)
            return command.state
    except AgentRunError as error:
        if error.status != 404:
            raise
    return TaskState.CANCELLED


@write_transaction
def task_mark_read(*, task_id: str, reader_id: str, scope: Scope) -> QueueReadCursor:
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


@write_transaction
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


# --- the dispatcher's moves ------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatched:
    task_id: str
    run_id: str | None  # None when the task failed before it had a run (its session refused it)
    attempt: int


_ELIGIBLE = f"""
SELECT t.* FROM queues_queuetask t
WHERE t.state = '{TaskState.PENDING}' AND (t.not_before IS NULL OR t.not_before <= statement_timestamp())
  AND NOT EXISTS (
    SELECT 1 FROM queues_queue q WHERE q.tenant_id = t.tenant_id AND q.name = t.queue
      AND (q.paused OR q.max_running <= (
        SELECT count(*) FROM queues_queuetask r
        WHERE r.state = '{TaskState.RUNNING}' AND r.tenant_id = t.tenant_id AND r.queue = t.queue)))
  AND NOT EXISTS (
    SELECT 1 FROM queues_tenantlimit l WHERE l.tenant_id = t.tenant_id AND l.max_running <= (
      SELECT count(*) FROM queues_queuetask r WHERE r.state = '{TaskState.RUNNING}' AND r.tenant_id = t.tenant_id))
ORDER BY t.priority DESC, t.created_at, t.id
LIMIT 1 FOR UPDATE OF t SKIP LOCKED
"""


def _within_limits(task: QueueTask) -> bool:
    """Under the queue's and the tenant's advisory locks (held to commit), so two dispatchers
    never both take the last free slot. One round trip: the locks, then the limits and counts."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_xact_lock(hashtext('agentrun-queue'), hashtext(%(queue_key)s)), "
            "pg_advisory_xact_lock(hashtext('agentrun-tenant'), hashtext(%(tenant)s))",
            {"queue_key": f"{task.tenant_id}/{task.queue}", "tenant": task.tenant_id},
        )
        cursor.execute(
            "SELECT q.paused, q.max_running, l.max_running, "
            "  CASE WHEN q.max_running IS NULL THEN 0 ELSE (SELECT count(*) FROM queues_queuetask r "
            f"    WHERE r.state = '{TaskState.RUNNING}' AND r.tenant_id = %(tenant)s AND r.queue = %(queue)s) END, "
            "  CASE WHEN l.max_running IS NULL THEN 0 ELSE (SELECT count(*) FROM queues_queuetask r "
            f"    WHERE r.state = '{TaskState.RUNNING}' AND r.tenant_id = %(tenant)s) END "
            "FROM (SELECT 1) one "
            "LEFT JOIN queues_queue q ON q.tenant_id = %(tenant)s AND q.name = %(queue)s "
            "LEFT JOIN queues_tenantlimit l ON l.tenant_id = %(tenant)s",
            {"tenant": task.tenant_id, "queue": task.queue},
        )
        paused, queue_limit, tenant_limit, queue_running, tenant_running = cursor.fetchone()
    if paused:
        return False
    if queue_limit is not None and queue_running >= queue_limit:
        return False
    return tenant_limit is None or tenant_running < tenant_limit


def dispatch_one() -> Dispatched | None:
    """Start the next eligible task (highest priority, oldest): create its run and first `turn`
    from its payload, record the attempt, mark it running. None when nothing can start now.
    One transaction: a cancel waits for it, then finds the run and cancels it too."""
    for _ in range(100):
        with transaction.atomic():
            task = next(iter(QueueTask.objects.raw(_ELIGIBLE)), None)
            if task is None:
                return None
            if _within_limits(task):
                return _start_attempt(task)
        # Another dispatcher took the last slot between our look and our lock: look again.
    return None


def _start_attempt(task: QueueTask) -> Dispatched:
    at = db_now()
    number = task.attempt_count + 1
    attempt = QueueAttempt(id=new_id("qa"), task=task, number=number, started_at=at)
    try:
        with transaction.atomic():
            run, _ = run_services.run_create(
                tenant_id=task.tenant_id,
                project_id=task.project_id,
                backend_profile=task.backend_profile,
                session_ref=task.session_ref,
                resource_bundle_ref=task.resource_bundle_ref,
                provider_id=task.provider_id,
                workspace_ref=task.workspace_ref,
                execution_policy=task.execution_policy,
                metadata=task.metadata,
                extra={"queueTaskId": task.id, "queueAttempt": number},
            )
            command, _ = run_services.command_create(run_id=run.id, command_type="turn", payload=task.payload or {})
    except AgentRunError as error:
        # The task can never start (its session belongs elsewhere): it fails, no retry.
        attempt.state, attempt.failure_kind, attempt.failure_message = TaskState.FAILED, error.kind, error.message
        attempt.finished_at = at
        attempt.save(force_insert=True)
        task.state, task.attempt_count = TaskState.FAILED, number
        task.latest_attempt = _attempt_ref(attempt)
        _bump(task, at, "state", "attempt_count", "latest_attempt")
        return Dispatched(task.id, None, number)
    attempt.run_id, attempt.command_id = run.id, command.id
    attempt.save(force_insert=True)
    task.state, task.attempt_count, task.not_before = TaskState.RUNNING, number, None
    task.latest_attempt = _attempt_ref(attempt)
    _bump(task, at, "state", "attempt_count", "not_before", "latest_attempt")
    return Dispatched(task.id, run.id, number)


def _attempt_ref(attempt: QueueAttempt) -> dict:
    ref = {
        "attemptId": attempt.id,
        "number": attempt.number,
        "runId": attempt.run_id,
        "commandId": attempt.command_id,
        "state": attempt.state,
        "startedAt": attempt.started_at.isoformat().replace("+00:00", "Z"),
    }
    if attempt.failure_kind:
        ref.update(failureKind=attempt.failure_kind, failureMessage=attempt.failure_message)
    return ref


def _policy(task: QueueTask) -> tuple[int, float, tuple]:
    policy = task.execution_policy or {}
    return (
        policy.get("maxAttempts") or DEFAULT_MAX_ATTEMPTS,
        policy.get("backoffSeconds") if policy.get("backoffSeconds") is not None else DEFAULT_BACKOFF_SECONDS,
        tuple(policy["retryOn"]) if policy.get("retryOn") is not None else DEFAULT_RETRY_ON,
    )


def ended_attempts(limit: int = 100) -> list[tuple[str, str]]:
    """(attempt, task) of open attempts whose run has ended (or is gone): what `settle` does."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT a.id, a.task_id FROM queues_queueattempt a LEFT JOIN runs_run r ON r.id = a.run_id "
            f"WHERE a.state = '{TaskState.RUNNING}' AND (r.id IS NULL OR r.status = ANY(%s)) "
            "ORDER BY a.started_at LIMIT %s",
            [[str(status) for status in RUN_TERMINAL], limit],
        )
        return cursor.fetchall()


@write_transaction
def settle(*, attempt_id: str, task_id: str) -> QueueTask | None:
    """The attempt's run ended: the task takes the run's outcome, or goes back to the queue for
    another attempt when its policy retries that failure kind (after a backoff that doubles
    each attempt). None when another settler holds the task, or it was settled already."""
    task = QueueTask.objects.select_for_update(skip_locked=True).filter(pk=task_id).first()
    if task is None:
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT a.number, a.run_id, a.command_id, a.started_at, r.id, r.status, r.failure_kind, r.failure_message, "
            "statement_timestamp() FROM queues_queueattempt a LEFT JOIN runs_run r ON r.id = a.run_id "
            f"WHERE a.id = %s AND a.state = '{TaskState.RUNNING}'",
            [attempt_id],
        )
        row = cursor.fetchone()
    if row is None:  # settled (or cancelled) while we waited for the task
        return None
    number, run_id, command_id, started_at, found, status, failure_kind, message, at = row
    if found is not None and status not in RUN_TERMINAL:
        return None
    if found is None:
        outcome, failure_kind, message = TaskState.FAILED, "infra-failed", "the attempt's run is gone"
    else:
        outcome = TASK_STATE_FOR_RUN[status]
    attempt = QueueAttempt(
        id=attempt_id,
        task=task,
        number=number,
        run_id=run_id,
        command_id=command_id,
        state=outcome,
        failure_kind=failure_kind,
        failure_message=message,
        started_at=started_at,
        finished_at=at,
    )
    attempt.save(update_fields=["state", "failure_kind", "failure_message", "finished_at"])
    if task.is_terminal or task.latest_attempt is None or task.latest_attempt.get("attemptId") != attempt_id:
        return task  # the task moved on (cancelled, or an operator rewrote it): only the attempt ends
    task.latest_attempt = _attempt_ref(attempt)
    max_attempts, backoff, retry_on = _policy(task)
    if (
        outcome in (TaskState.FAILED, TaskState.BLOCKED)
        and failure_kind in retry_on
        and task.attempt_count < max_attempts
    ):
        delay = min(backoff * 2 ** (task.attempt_count - 1), MAX_BACKOFF_SECONDS)
        task.state, task.not_before = TaskState.PENDING, at + timedelta(seconds=delay)
        notify.notify(notify.QUEUE_CHANGED)
    else:
        task.state = outcome
    _bump(task, at, "state", "not_before", "latest_attempt")
    return task


def next_retry_at() -> datetime | None:
    """When the earliest backed-off task may start (the dispatcher sleeps until then at most)."""
    return (
        QueueTask.objects.filter(state=TaskState.PENDING, not_before__isnull=False)
        .order_by("not_before")
        .values_list("not_before", flat=True)
        .first()
    )
