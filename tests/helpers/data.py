"""Small builders of rows, through the services as the API would make them."""

from __future__ import annotations

from agentrun.errors import AgentRunError
from queues import services as queue_services
from runs import services
from runs.models import Run, RunEvent

TENANT = "acme"
PROJECT = "web"


def make_run(*, tenant=TENANT, project=PROJECT, backend="echo", session_id: str | None = None, **kwargs):
    session_ref = kwargs.pop("session_ref", None)
    if session_id is not None:
        session_ref = {"sessionId": session_id, **(session_ref or {})}
    run, _ = services.run_create(
        tenant_id=tenant, project_id=project, backend_profile=backend, session_ref=session_ref, **kwargs
    )
    return run


def claim(run, runner_id="runner-1", lease_ms=60_000):
    return services.run_claim(run_id=run.id, runner_id=runner_id, lease_ms=lease_ms)


def events_of(run_id):
    return list(RunEvent.objects.filter(run_id=run_id).order_by("seq"))


def phases(run_id):
    return [(e.type, e.payload.get("phase")) for e in events_of(run_id)]


def make_task(queue="default", *, tenant=TENANT, project=PROJECT, priority=0, key=None, **fields):
    fields.setdefault("lane", "main")
    fields.setdefault("title", "a task")
    fields.setdefault("backend_profile", "echo")
    fields.setdefault("payload", {"prompt": "do the thing"})
    task, _ = queue_services.task_create(
        tenant_id=tenant, project_id=project, queue=queue, priority=priority, idempotency_key=key, **fields
    )
    return task


def finish_run(run_id, terminal_status="completed", failure_kind=None, runner="runner-1"):
    """What a runner does at the end: claim (if it has not) and finish."""
    run = services.run_claim(run_id=run_id, runner_id=runner, lease_ms=60_000)
    return services.run_finish(
        run_id=run_id,
        runner_id=runner,
        lease_epoch=run.lease_epoch,
        terminal_status=terminal_status,
        failure_kind=failure_kind,
    )


def settle_all():
    settled = 0
    for attempt_id, task_id in queue_services.ended_attempts():
        settled += queue_services.settle(attempt_id=attempt_id, task_id=task_id) is not None
    return settled


def usurp(run_id, runner_id="usurper", tries=50):
    """Let the run's lease lapse and claim it for another runner; False if it never could.

    A live runner's heartbeat may renew the lease between the two writes: then lapse it again.
    """
    for _ in range(tries):
        Run.objects.filter(pk=run_id).update(lease_expires_at=None)
        try:
            services.run_claim(run_id=run_id, runner_id=runner_id, lease_ms=60_000)
        except AgentRunError as error:
            if error.kind != "runner-lease-conflict":
                raise
        else:
            return True
    return False
