"""Small builders for queue tests."""

from __future__ import annotations

from queues import services
from runs import services as run_services
from tests.conftest import PROJECT, TENANT


def make_task(queue="default", *, tenant=TENANT, project=PROJECT, priority=0, key=None, **fields):
    fields.setdefault("lane", "main")
    fields.setdefault("title", "a task")
    fields.setdefault("backend_profile", "echo")
    fields.setdefault("payload", {"prompt": "do the thing"})
    task, _ = services.task_create(
        tenant_id=tenant, project_id=project, queue=queue, priority=priority, idempotency_key=key, **fields
    )
    return task


def finish_run(run_id, terminal_status="completed", failure_kind=None, runner="runner-1"):
    """What a runner does at the end: claim (if it has not) and finish."""
    run = run_services.run_claim(run_id=run_id, runner_id=runner, lease_ms=60_000)
    return run_services.run_finish(
        run_id=run_id,
        runner_id=runner,
        lease_epoch=run.lease_epoch,
        terminal_status=terminal_status,
        failure_kind=failure_kind,
    )


def settle_all():
    settled = 0
    for attempt_id, task_id in services.ended_attempts():
        settled += services.settle(attempt_id=attempt_id, task_id=task_id) is not None
    return settled
