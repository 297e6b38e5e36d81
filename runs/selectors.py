"""Reads of runs, commands, events and runner jobs, scoped by the caller's key."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from django.db.models import Q, Subquery

from agentrun.auth import Scope
from agentrun.errors import SCHEMA_INVALID, AgentRunError, invalid, not_found
from agentrun.vocabulary import OUTPUT_EVENT_TYPES
from runs.models import RUN_TERMINAL, Command, ResourceBundle, Run, RunEvent, RunnerJob
from runs.validation import bundle_name
from sessions import selectors as session_selectors

UNRESTRICTED = Scope.unrestricted()
_OUTPUT_TYPES = sorted(OUTPUT_EVENT_TYPES)


def run_get(*, run_id: str, scope: Scope = UNRESTRICTED) -> Run:
    run = Run.objects.filter(scope.q(run="id"), pk=run_id).first()
    if run is None:
        raise not_found("run", run_id)
    return run


def run_exists(*, run_id: str, scope: Scope = UNRESTRICTED) -> None:
    if not Run.objects.filter(scope.q(run="id"), pk=run_id).exists():
        raise not_found("run", run_id)


@dataclass(frozen=True)
class RunOutcome:
    """A run's status and failure. Once the run has ended they never change again."""

    status: str
    failure_kind: str | None
    failure_message: str | None

    @property
    def ended(self) -> bool:
        return self.status in RUN_TERMINAL


def run_outcomes(*, run_ids: Collection[str]) -> dict[str, RunOutcome]:
    """The outcome of each run of `run_ids` that exists, in one query (none for no ids); a run
    that is gone has no entry."""
    rows = Run.objects.filter(pk__in=run_ids).values_list("id", "status", "failure_kind", "failure_message")
    return {run_id: RunOutcome(status, failure_kind, message) for run_id, status, failure_kind, message in rows}


def event_list(*, run_id: str, after_seq: int, limit: int, types: Collection[str] | None = None) -> list[RunEvent]:
    """Events after `after_seq` in seq order; `types` filters in SQL before the limit."""
    events = RunEvent.objects.filter(run_id=run_id, seq__gt=after_seq)
    if types is not None:
        events = events.filter(type__in=types)
    return list(events.order_by("seq")[:limit])


def output_event_list(*, run_id: str, after_seq: int, limit: int) -> list[RunEvent]:
    return event_list(run_id=run_id, after_seq=after_seq, limit=limit, types=_OUTPUT_TYPES)


# What a runner acts on: the server's notes on commands and cancellation, and the end.
CONTROL_PHASES = ("command-created", "command-terminal", "cancel-requested")


def control_event_list(*, run_id: str, after_seq: int, limit: int) -> list[RunEvent]:
    """`terminal_status` and the `backend_status` events of CONTROL_PHASES, in seq order."""
    events = RunEvent.objects.filter(run_id=run_id, seq__gt=after_seq).filter(
        Q(type="terminal_status") | Q(type="backend_status", payload__phase__in=CONTROL_PHASES)
    )
    return list(events.order_by("seq")[:limit])


def run_ended(*, run_id: str) -> bool:
    return Run.objects.filter(pk=run_id, status__in=RUN_TERMINAL).exists()


def session_next_run_id(*, session_id: str, after_run_id: str | None) -> str | None:
    """The session's run created after `after_run_id` (by creation time, then id), or its first
    run when `after_run_id` is None."""
    runs = Run.objects.filter(session_id=session_id)
    if after_run_id is not None:
        created = Run.objects.filter(pk=after_run_id).values("created_at")[:1]
        runs = runs.filter(Q(created_at__gt=Subquery(created)) | Q(created_at=Subquery(created), id__gt=after_run_id))
    return runs.order_by("created_at", "id").values_list("id", flat=True).first()


def session_run_id(*, session_id: str, run_id: str | None, scope: Scope = UNRESTRICTED) -> str | None:
    """The run whose events a session's trace shows: `run_id`, which must belong to the session
    (404 otherwise), else the session's active run, else its last one (or None)."""
    session = session_selectors.session_get(session_id=session_id, scope=scope)
    if not run_id:
        return session.active_run_id or session.last_run_id
    run = Run.objects.filter(scope.q(run="id"), pk=run_id).only("session_id").first()
    if run is None:
        raise not_found("run", run_id)
    if run.session_id != session_id:
        raise AgentRunError(
            SCHEMA_INVALID,
            f"run {run_id} does not belong to session {session_id}",
            status=404,
            details={"sessionId": session_id, "runId": run_id},
        )
    return run_id


def command_list(*, run_id: str, after_seq: int, limit: int) -> list[Command]:
    return list(Command.objects.filter(run_id=run_id, seq__gt=after_seq).order_by("seq")[:limit])


def command_get(*, command_id: str, scope: Scope = UNRESTRICTED) -> Command:
    command = Command.objects.filter(
        scope.q(tenant="run__tenant_id", project="run__project_id", run="run_id"), pk=command_id
    ).first()
    if command is None:
        raise not_found("command", command_id)
    return command


def runner_job_list(*, run_id: str, command_id: str | None = None) -> list[RunnerJob]:
    jobs = RunnerJob.objects.filter(run_id=run_id)
    if command_id:
        jobs = jobs.filter(command_id=command_id)
    return list(jobs.order_by("created_at", "id"))


def resource_bundle_for(*, tenant_id: str, resource_bundle_ref: dict | None) -> ResourceBundle | None:
    """The operator's resource bundle a run of the tenant starts with: the one its (validated)
    ref names, else the tenant's default, else None. 400 naming the bundle when the tenant has
    none of that name (another tenant's bundle is as unknown as a missing one)."""
    name = bundle_name(resource_bundle_ref)
    if name is None:
        return ResourceBundle.objects.filter(tenant_id=tenant_id, is_default=True).first()
    bundle = ResourceBundle.objects.filter(tenant_id=tenant_id, name=name).first()
    if bundle is None:
        raise invalid(f"unknown resource bundle {name!r}", field="resourceBundleRef.name")
    return bundle


def check_workspace_credentials(workspace_ref: object, bundle: ResourceBundle | None) -> None:
    """A git workspace's `credentialsRef` must be a variable the run's bundle provides, when
    the bundle's variables are all known (a secret's keys taken whole, `env_from`, are not)."""
    if not isinstance(workspace_ref, dict) or workspace_ref.get("kind") != "git":
        return
    name = workspace_ref.get("credentialsRef")
    if name is None or bundle is None or bundle.env_from:
        return
    if name not in {item["name"] for item in bundle.env}:
        raise invalid(
            f"workspaceRef.credentialsRef {name!r} is no variable of resource bundle {bundle.name!r}",
            field="workspaceRef.credentialsRef",
        )
