"""Reads of runs, commands, events and runner jobs, scoped by the caller's key."""

from __future__ import annotations

from agentrun.auth import Scope
from agentrun.errors import not_found
from runs.models import Command, Run, RunEvent, RunnerJob

UNRESTRICTED = Scope.unrestricted()


def run_get(*, run_id: str, scope: Scope = UNRESTRICTED) -> Run:
    run = Run.objects.filter(scope.q(run="id"), pk=run_id).first()
    if run is None:
        raise not_found("run", run_id)
    return run


def run_exists(*, run_id: str, scope: Scope = UNRESTRICTED) -> None:
    if not Run.objects.filter(scope.q(run="id"), pk=run_id).exists():
        raise not_found("run", run_id)


def event_list(*, run_id: str, after_seq: int, limit: int, types=None) -> list[RunEvent]:
    """Events after `after_seq` in seq order; `types` filters in SQL before the limit."""
    events = RunEvent.objects.filter(run_id=run_id, seq__gt=after_seq)
    if types is not None:
        events = events.filter(type__in=types)
    return list(events.order_by("seq")[:limit])


def command_list(*, run_id: str, after_seq: int, limit: int) -> list[Command]:
    return list(Command.objects.filter(run_id=run_id, seq__gt=after_seq).order_by("seq")[:limit])


def command_get(*, command_id: str, scope: Scope = UNRESTRICTED) -> Command:
    command = (
        Command.objects.filter(scope.q(tenant="run__tenant_id", project="run__project_id", run="run_id"), pk=command_id)
        .first()
    )
    if command is None:
        raise not_found("command", command_id)
    return command


def runner_job_list(*, run_id: str, command_id: str | None = None) -> list[RunnerJob]:
    jobs = RunnerJob.objects.filter(run_id=run_id)
    if command_id:
        jobs = jobs.filter(command_id=command_id)
    return list(jobs.order_by("created_at", "id"))
