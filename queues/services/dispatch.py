"""The dispatcher's two moves: turn a pending task into a run (dispatch) and follow the run to
its end (settle), with the task's retry policy."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, models, transaction
from django.db.models import Q
from django.db.models.functions import Now
from psycopg import sql

from agentrun import notify
from agentrun.clock import db_now
from agentrun.errors import AgentRunError
from agentrun.ids import new_id
from agentrun.sqlnames import column, table
from agentrun.transactions import write_transaction
from agentrun.wire import iso
from queues.models import Queue, QueueAttempt, QueueTask, TaskState, TenantLimit
from queues.services.tasks import (
    DEFAULT_BACKOFF_SECONDS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_RETRY_ON,
    MAX_BACKOFF_SECONDS,
    TASK_STATE_FOR_RUN,
    _bump,
)
from runs import selectors as run_selectors
from runs import services as run_services
from runs.models import RunStatus
from runs.selectors import RunOutcome

logger = logging.getLogger(__name__)
# --- the dispatcher's moves ------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatched:
    task_id: str
    run_id: str | None  # None when the task failed before it had a run (its session refused it)
    attempt: int


def _names(model: type[models.Model], alias: str, *fields: str) -> dict[str, sql.Identifier]:
    """`{alias}_{field}` for each field: the statement's columns of `model` under `alias`."""
    return {f"{alias}_{field}": column(model, field, alias) for field in fields}


_PENDING, _RUNNING = sql.Literal(TaskState.PENDING.value), sql.Literal(TaskState.RUNNING.value)
_TASK_FIELDS = ("id", "tenant_id", "queue", "state", "priority", "created_at", "not_before")
_LIMIT_NAMES = {
    "tasks": table(QueueTask),
    "queues": table(Queue),
    "limits": table(TenantLimit),
    "pending": _PENDING,
    "running": _RUNNING,
    **_names(QueueTask, "t", *_TASK_FIELDS),
    **_names(QueueTask, "r", *_TASK_FIELDS),
    **_names(Queue, "q", "tenant_id", "name", "paused", "max_running"),
    **_names(TenantLimit, "l", "tenant_id", "max_running"),
}
# Raw: the dispatcher's hot claim, one statement in the shape the task_pending_order index
# serves, limits checked inside it and only the task's row locked; in the ORM that shape would
# hide behind nested Exists, Subquery and Count.
_ELIGIBLE = sql.SQL(
    """
SELECT t.* FROM {tasks} t
WHERE {t_state} = {pending} AND ({t_not_before} IS NULL OR {t_not_before} <= statement_timestamp())
  AND NOT EXISTS (
    SELECT 1 FROM {queues} q WHERE {q_tenant_id} = {t_tenant_id} AND {q_name} = {t_queue}
      AND ({q_paused} OR {q_max_running} <= (
        SELECT count(*) FROM {tasks} r
        WHERE {r_state} = {running} AND {r_tenant_id} = {t_tenant_id} AND {r_queue} = {t_queue})))
  AND NOT EXISTS (
    SELECT 1 FROM {limits} l WHERE {l_tenant_id} = {t_tenant_id} AND {l_max_running} <= (
      SELECT count(*) FROM {tasks} r WHERE {r_state} = {running} AND {r_tenant_id} = {t_tenant_id}))
ORDER BY {t_priority} DESC, {t_created_at}, {t_id}
LIMIT 1 FOR UPDATE OF t SKIP LOCKED
"""
).format(**_LIMIT_NAMES)
# Raw: the two limits and the two running counts in one statement; as ORM queries, four.
_LIMITS = sql.SQL(
    "SELECT {q_paused}, {q_max_running}, {l_max_running}, "
    "  CASE WHEN {q_max_running} IS NULL THEN 0 ELSE (SELECT count(*) FROM {tasks} r "
    "    WHERE {r_state} = {running} AND {r_tenant_id} = %(tenant)s AND {r_queue} = %(queue)s) END, "
    "  CASE WHEN {l_max_running} IS NULL THEN 0 ELSE (SELECT count(*) FROM {tasks} r "
    "    WHERE {r_state} = {running} AND {r_tenant_id} = %(tenant)s) END "
    "FROM (SELECT 1) one "
    "LEFT JOIN {queues} q ON {q_tenant_id} = %(tenant)s AND {q_name} = %(queue)s "
    "LEFT JOIN {limits} l ON {l_tenant_id} = %(tenant)s"
).format(**_LIMIT_NAMES)


def _within_limits(task: QueueTask) -> bool:
    """Under the queue's and the tenant's advisory locks (held to commit), so two dispatchers
    never both take the last free slot: the locks, then the limits and counts."""
    with connection.cursor() as cursor:
        # Raw: the ORM has no advisory locks.
        cursor.execute(
            "SELECT pg_advisory_xact_lock(hashtext('agentrun-queue'), hashtext(%(queue_key)s)), "
            "pg_advisory_xact_lock(hashtext('agentrun-tenant'), hashtext(%(tenant)s))",
            {"queue_key": f"{task.tenant_id}/{task.queue}", "tenant": task.tenant_id},
        )
        cursor.execute(_LIMITS, {"tenant": task.tenant_id, "queue": task.queue})
        paused, queue_limit, tenant_limit, queue_running, tenant_running = cursor.fetchone()
    if paused:
        return False
    if queue_limit is not None and queue_running >= queue_limit:
        return False
    return tenant_limit is None or tenant_running < tenant_limit


def dispatch_one() -> Dispatched | None:
    """Start the next eligible task (highest priority, oldest): create its run and first `turn`
    from its payload, record the attempt, mark it running. None when nothing can start now.
    One transaction per look: a cancel waits for it, then finds the run and cancels it too."""
    for _ in range(100):
        over_limit, dispatched = _dispatch_next()
        if not over_limit:
            return dispatched
        # Another dispatcher took the last slot between our look and our lock: look again.
    return None


@write_transaction(durable=True)
def _dispatch_next() -> tuple[bool, Dispatched | None]:
    """One look: (over a limit, the attempt started). Over a limit when the task found has no
    free slot once the limits' locks are held; nothing started and not over: nothing eligible."""
    task = next(iter(QueueTask.objects.all().raw(_ELIGIBLE)), None)
    if task is None:
        return False, None
    if not _within_limits(task):
        return True, None
    return False, _start_attempt(task)


def _start_attempt(task: QueueTask) -> Dispatched:
    at = db_now()
    number = task.attempt_count + 1
    attempt = QueueAttempt(id=new_id("qa"), task=task, number=number, started_at=at)
    try:
        with transaction.atomic():
            run, _ = run_services.run_create_in_transaction(
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
            command, _ = run_services.command_create_in_transaction(
                run_id=run.id, command_type="turn", payload=task.payload or {}
            )
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


def _attempt_ref(attempt: QueueAttempt) -> dict[str, Any]:
    ref: dict[str, Any] = {
        "attemptId": attempt.id,
        "number": attempt.number,
        "runId": attempt.run_id,
        "commandId": attempt.command_id,
        "state": attempt.state,
        "startedAt": iso(attempt.started_at),
    }
    if attempt.failure_kind:
        ref.update(failureKind=attempt.failure_kind, failureMessage=attempt.failure_message)
    return ref


def _policy(task: QueueTask) -> tuple[int, float, tuple[str, ...]]:
    policy: dict[str, Any] = task.execution_policy or {}
    max_attempts: int = policy.get("maxAttempts") or DEFAULT_MAX_ATTEMPTS
    backoff: float = policy["backoffSeconds"] if policy.get("backoffSeconds") is not None else DEFAULT_BACKOFF_SECONDS
    retry_on = tuple(policy["retryOn"]) if policy.get("retryOn") is not None else DEFAULT_RETRY_ON
    return max_attempts, backoff, retry_on


# Open attempts read per look for the ended ones (their runs in one more query).
SETTLE_SCAN = 500


@dataclass(frozen=True)
class EndedAttempt:
    attempt_id: str
    task_id: str
    run: RunOutcome | None  # how the attempt's run ended; None when the run is gone


def attempts_to_settle(limit: int = 100) -> list[EndedAttempt]:
    """Open attempts whose run has ended (or is gone), oldest first, at most `limit`, each with
    its run's outcome. Open attempts are read SETTLE_SCAN at a time, and each such batch's runs
    in one query through runs' selectors (a run's end never changes, so it may be read before
    `settle_attempt` takes the task's lock)."""
    ended: list[EndedAttempt] = []
    open_attempts = QueueAttempt.objects.filter(state=TaskState.RUNNING).order_by("started_at", "id")
    batch = open_attempts
    while len(ended) < limit:
        rows = list(batch.values_list("id", "task_id", "run_id", "started_at")[:SETTLE_SCAN])
        runs = run_selectors.run_outcomes(run_ids=[run_id for _, _, run_id, _ in rows if run_id])
        for attempt_id, task_id, run_id, _ in rows:
            run = runs.get(run_id) if run_id else None
            if run is None or run.ended:
                ended.append(EndedAttempt(attempt_id, task_id, run))
        if len(rows) < SETTLE_SCAN:
            break
        last_id, last_started = rows[-1][0], rows[-1][3]
        batch = open_attempts.filter(Q(started_at__gt=last_started) | Q(started_at=last_started, id__gt=last_id))
    return ended[:limit]


def ended_attempts(limit: int = 100) -> list[tuple[str, str]]:
    """(attempt, task) of open attempts whose run has ended (or is gone): what `settle` takes."""
    return [(ended.attempt_id, ended.task_id) for ended in attempts_to_settle(limit)]


def settle(*, attempt_id: str, task_id: str) -> QueueTask | None:
    """`settle_attempt` for one attempt, its run read first (through runs' selectors)."""
    run_id = QueueAttempt.objects.filter(pk=attempt_id).values_list("run_id", flat=True).first()
    run = run_selectors.run_outcomes(run_ids=[run_id]).get(run_id) if run_id else None
    return settle_attempt(ended=EndedAttempt(attempt_id, task_id, run))


@write_transaction(durable=True)
def settle_attempt(*, ended: EndedAttempt) -> QueueTask | None:
    """The attempt's run ended: the task takes the run's outcome, or goes back to the queue for
    another attempt when its policy retries that failure kind (after a backoff that doubles
    each attempt). None when another settler holds the task, it was settled already, or the run
    has not ended."""
    if ended.run is not None and not ended.run.ended:
        return None
    task = QueueTask.objects.select_for_update(skip_locked=True).filter(pk=ended.task_id).first()
    if task is None:
        return None
    attempt = (
        QueueAttempt.objects.filter(pk=ended.attempt_id, state=TaskState.RUNNING).annotate(settled_at=Now()).first()
    )
    if attempt is None:  # settled (or cancelled) while we waited for the task
        return None
    at = attempt.settled_at
    failure_kind: str | None
    message: str | None
    if ended.run is None:
        outcome, failure_kind, message = TaskState.FAILED, "infra-failed", "the attempt's run is gone"
    else:
        outcome = TASK_STATE_FOR_RUN[RunStatus(ended.run.status)]
        failure_kind, message = ended.run.failure_kind, ended.run.failure_message
    attempt.state, attempt.failure_kind, attempt.failure_message = outcome, failure_kind, message
    attempt.finished_at = at
    attempt.save(update_fields=["state", "failure_kind", "failure_message", "finished_at"])
    if task.is_terminal or task.latest_attempt is None or task.latest_attempt.get("attemptId") != ended.attempt_id:
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
