"""Every write to runs, commands, events, runners and runner jobs.

Each public service is one transaction (a savepoint when a caller composes services in its own
transaction, as the queue's dispatcher does). Locks are taken in one order: queue task, run,
command, session, the session version counter, the queue version counter. Runner writes are fenced: they carry
the `leaseEpoch` of their claim and change nothing when it is no longer the run's.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from django.db import IntegrityError, connection
from django.db.models.functions import Now
from psycopg import sql
from psycopg.types.json import Jsonb

from agentrun import backends, notify
from agentrun.auth import Scope
from agentrun.clock import db_now
from agentrun.errors import (
    CANCELLED,
    RUNNER_LEASE_CONFLICT,
    SCHEMA_INVALID,
    TENANT_POLICY_DENIED,
    AgentRunError,
    conflict,
    invalid,
    not_found,
)
from agentrun.fields import SESSION_ID_MAX_LENGTH, check_identifier
from agentrun.ids import new_id, stable_hash
from agentrun.redaction import redact
from agentrun.transactions import write_transaction
from agentrun.vocabulary import COMMAND_TYPES, EVENT_TYPES, command_state_for, run_status_for
from agentrun.wire import parse_iso
from runs.models import COMMAND_OPEN, Command, CommandState, Run, RunEvent, Runner, RunnerJob, RunStatus
from sessions import services as session_services

UNRESTRICTED = Scope.unrestricted()
DEFAULT_CANCEL_REASON = "cancel requested"
RUN_FINISHED_MESSAGE = "run finished"


# --- helpers -------------------------------------------------------------------------------


def _lock_run(run_id: str, scope: Scope) -> Run:
    """The run, row-locked, with `db_now` (the database clock) for this transaction."""
    run = Run.objects.select_for_update(no_key=True).filter(scope.q(run="id"), pk=run_id).annotate(db_now=Now()).first()
    if run is None:
        raise not_found("run", run_id)
    return run


def _lock_run_for_append(run_id: str, scope: Scope, batch_key: str | None) -> tuple[Run, tuple | None]:
    """`_lock_run` for the hottest path, in one statement: the columns an append reads and the
    batch already recorded under `batch_key` (payload_hash, first_seq, count), if any. The run
    returned carries only those columns; it is never saved."""
    conditions, params = ["r.id = %s"], [batch_key, run_id]
    for column, value in (("tenant_id", scope.tenant_id), ("project_id", scope.project_id), ("id", scope.run_id)):
        if value is not None:
            conditions.append(f"r.{column} = %s")
            params.append(value)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT r.status, r.claimed_by, r.lease_epoch, r.last_event_seq, r.session_id, "
            "statement_timestamp(), b.payload_hash, b.first_seq, b.count "
            "FROM runs_run r LEFT JOIN runs_eventbatch b ON b.run_id = r.id AND b.batch_key = %s "
            f"WHERE {' AND '.join(conditions)} FOR NO KEY UPDATE OF r",
            params,
        )
        row = cursor.fetchone()
    if row is None:
        raise not_found("run", run_id)
    status, claimed_by, lease_epoch, last_event_seq, session_id, db_now, *batch = row
    run = Run(
        id=run_id,
        status=status,
        claimed_by=claimed_by,
        lease_epoch=lease_epoch,
        last_event_seq=last_event_seq,
        session_id=session_id,
    )
    run.db_now = db_now
    return run, (tuple(batch) if batch[0] is not None else None)


def _terminal_run_error(run: Run) -> AgentRunError:
    kind = run.failure_kind or (CANCELLED if run.status == RunStatus.CANCELLED else SCHEMA_INVALID)
    return conflict(kind, f"run {run.id} is already terminal: {run.status}", runId=run.id, status=run.status)


def _check_holder(run: Run, runner_id: str, lease_epoch: int) -> None:
    if run.claimed_by != runner_id or run.lease_epoch != lease_epoch:
        raise conflict(
            RUNNER_LEASE_CONFLICT,
            f"run {run.id} is not held by runner {runner_id} at lease epoch {lease_epoch}",
            runId=run.id,
            leaseEpoch=run.lease_epoch,
        )


class NewEvent:
    """An event this operation appends: what the insert and the response need, without the
    cost of a model instance per row (a batch holds up to 500)."""

    __slots__ = ("created_at", "id", "payload", "run_id", "seq", "type")

    def __init__(self, *, id, run_id, seq, type, payload, created_at):  # noqa: A002 - the wire's names
        self.id, self.run_id, self.seq, self.type = id, run_id, seq, type
        self.payload, self.created_at = payload, created_at


class _RunWrite:
    """Collects the events of one operation on a locked run and writes them in one insert,
    with one update of the run's seq counter and one session touch."""

    def __init__(self, run: Run):
        self.run = run
        self.at = run.db_now
        self.events: list[NewEvent] = []

    def emit(self, event_type: str, payload: dict, *, posted: bool = False) -> NewEvent:
        """Add an event. `posted`: a runner's, whose payload lists what was sanitized."""
        self.run.last_event_seq += 1
        event = NewEvent(
            id=new_id("evt"),
            run_id=self.run.id,
            seq=self.run.last_event_seq,
            type=event_type,
            payload=redact(payload, list_sanitized=posted),
            created_at=self.at,
        )
        self.events.append(event)
        return event

    def save(self, *, bookkeeping: dict | None = None, extra_statements=(), **fields) -> None:
        """Write the events and the run's changed fields (every run change sets updatedAt;
        `bookkeeping`, such as seq counters, is written without counting as a change).

        The events, the session's event touch, the run's seq counter, the wake-up NOTIFY and any
        `extra_statements` go to the database as one statement: this is every append's path.
        """
        if fields:
            fields["updated_at"] = self.at
        fields.update(bookkeeping or {})
        if fields:
            Run.objects.filter(pk=self.run.pk).update(**fields)
            for name, value in fields.items():
                setattr(self.run, name, value)
        if self.events:
            _write_events(self.run, self.events, self.at, extra_statements)


def _write_events(run: Run, events: list[NewEvent], at: datetime, extra_statements) -> None:
    """One round trip for an append of any size: the rows through unnest of column arrays (so
    neither the statement nor its cost in Python grows per row), then the writes that go with
    them as data-modifying CTEs."""
    ctes = [
        (
            "INSERT INTO runs_runevent (id, run_id, seq, type, payload, created_at) "
            "SELECT e.id, %s, e.seq, e.type, e.payload::jsonb, %s "
            "FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[]) AS e(id, seq, type, payload)",
            [
                run.id,
                at,
                [event.id for event in events],
                [event.seq for event in events],
                [event.type for event in events],
                [json.dumps(event.payload, ensure_ascii=False) for event in events],
            ],
        ),
        *extra_statements,
    ]
    if run.session_id:
        ctes.append(
            session_services.session_event_touch_sql(
                session_id=run.session_id, last_event_seq=run.last_event_seq, at=at
            )
        )
    statement = sql.SQL(
        "WITH {} UPDATE runs_run SET last_event_seq = %s WHERE id = %s RETURNING pg_notify(%s, %s)"
    ).format(
        sql.SQL(", ").join(
            sql.SQL("{} AS ({})").format(
                sql.Identifier(f"w{index}"), cte if isinstance(cte, sql.Composable) else sql.SQL(cte)
            )
            for index, (cte, _) in enumerate(ctes)
        )
    )
    params = [param for _, statement_params in ctes for param in statement_params]
    params += [run.last_event_seq, run.id, notify.CHANNEL, notify.run_topic(run.id)]
    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def _cancel_open_commands(write: _RunWrite, *, message: str | None) -> None:
    """Cancel the run's open commands in seq order, one timestamp, an event each (cancelRun's
    cascade; finishRun adds `message`). The session is touched once, by the run's end."""
    open_commands = list(
        Command.objects.filter(run_id=write.run.id, state__in=COMMAND_OPEN).order_by("seq").values_list("id", flat=True)
    )
    if not open_commands:
        return
    Command.objects.filter(pk__in=open_commands).update(
        state=CommandState.CANCELLED,
        terminal_status=CANCELLED,
        failure_kind=CANCELLED,
        failure_message=message,
        updated_at=write.at,
    )
    for command_id in open_commands:
        payload = {
            "phase": "command-terminal",
            "commandId": command_id,
            "state": CommandState.CANCELLED,
            "terminalStatus": CANCELLED,
            "failureKind": CANCELLED,
        }
        if message is not None:
            payload["message"] = message
        write.emit("backend_status", payload)


def _thread_update(write: _RunWrite, *, thread_id: str, turn_id: str | None) -> dict:
    """The session learns the thread; the run's ref is rebuilt from the session (A4, A8)."""
    run = write.run
    new_ref = session_services.session_thread_update(
        run_session_ref=run.session_ref,
        tenant_id=run.tenant_id,
        project_id=run.project_id,
        backend_profile=run.backend_profile,
        run_id=run.id,
        thread_id=thread_id,
        turn_id=turn_id,
        at=write.at,
    )
    run.session_ref = new_ref
    write.emit(
        "backend_status",
        {"phase": "session-updated", "sessionRef": session_services.summarize_session_ref(new_ref), "turnId": turn_id},
    )
    return new_ref


def _end_run(
    write: _RunWrite,
    *,
    terminal_status: str,
    failure_kind: str | None,
    failure_message: str | None,
    thread_id: str | None = None,
    turn_id: str | None = None,
    cancel_reason: str | None = None,
) -> Run:
    """Finish or cancel a locked, non-terminal run: cascade its open commands, record the thread,
    emit the terminal event, release the lease (claimedBy is kept), and end the session's turn."""
    run = write.run
    cancelling = cancel_reason is not None
    _cancel_open_commands(write, message=None if cancelling else RUN_FINISHED_MESSAGE)
    fields = {}
    if thread_id and run.session_id:
        fields["session_ref"] = _thread_update(write, thread_id=thread_id, turn_id=turn_id)
    if cancelling:
        write.emit("backend_status", {"phase": "cancel-requested", "reason": cancel_reason})
    write.emit(
        "terminal_status",
        {"terminalStatus": terminal_status, "failureKind": failure_kind, "message": failure_message},
    )
    # Whoever follows runs (the queue) learns at commit that one ended.
    notify.notify(notify.RUNS_ENDED)
    if run.session_id:
        session_services.session_touch_run_ended(
            session_id=run.session_id,
            run_id=run.id,
            terminal_status=terminal_status,
            failure_kind=failure_kind,
            at=write.at,
        )
    write.save(
        **fields,
        status=run_status_for(terminal_status),
        terminal_status=terminal_status,
        failure_kind=failure_kind,
        failure_message=failure_message,
        lease_expires_at=None,
    )
    return run


# --- runs ----------------------------------------------------------------------------------


def validate_session_ref(session_ref) -> dict | None:
    if session_ref is None:
        return None
    if not isinstance(session_ref, dict):
        raise invalid("sessionRef must be an object", field="sessionRef")
    session_id = session_ref.get("sessionId")
    if isinstance(session_id, str) and not session_id.strip():
        session_id = None
    # Any text an identifier may hold, '/' included (`owner/repo#42`): paths percent-encode it.
    check_identifier(session_id, field="sessionRef.sessionId", max_length=SESSION_ID_MAX_LENGTH)
    for key in ("conversationId", "threadId"):
        check_identifier(session_ref.get(key), field=f"sessionRef.{key}", max_length=500, required=False)
    if session_ref.get("metadata") is not None and not isinstance(session_ref["metadata"], dict):
        raise invalid("sessionRef.metadata must be an object", field="sessionRef.metadata")
    parse_iso(session_ref.get("expiresAt"), field="sessionRef.expiresAt")
    return session_ref


def validate_resource_bundle_ref(ref) -> dict | None:
    if ref is None:
        return None
    if not isinstance(ref, dict):
        raise invalid("resourceBundleRef must be an object", field="resourceBundleRef")
    for key in ("kind", "repoUrl"):
        if not isinstance(ref.get(key), str) or not ref[key]:
            raise invalid(f"resourceBundleRef.{key} must be a non-empty string", field=f"resourceBundleRef.{key}")
    bundles = ref.get("bundles")
    if not isinstance(bundles, list) or not all(isinstance(item, dict) for item in bundles):
        raise invalid("resourceBundleRef.bundles must be a list of objects", field="resourceBundleRef.bundles")
    for index, item in enumerate(bundles):
        for key in ("subpath", "targetPath"):
            if not isinstance(item.get(key), str):
                raise invalid(
                    f"resourceBundleRef.bundles[{index}].{key} must be a string",
                    field=f"resourceBundleRef.bundles.{index}.{key}",
                )
    for key in ("promptRefs", "requiredSkills"):
        items = ref.get(key)
        if items is not None and (
            not isinstance(items, list)
            or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items)
        ):
            raise invalid(
                f"resourceBundleRef.{key} must be a list of objects with a name", field=f"resourceBundleRef.{key}"
            )
    credential = ref.get("credentialRef")
    if credential is not None and (not isinstance(credential, dict) or not isinstance(credential.get("name"), str)):
        raise invalid(
            "resourceBundleRef.credentialRef must be an object with a name", field="resourceBundleRef.credentialRef"
        )
    return ref


def summarize_resource_bundle_ref(ref: dict | None) -> dict | None:
    """SPEC §4.11: what an event may say of a resource bundle (names and refs, no values)."""
    if not ref:
        return None
    root_commit = ref.get("commitId")
    root_ref = ref.get("ref")
    bundles = ref.get("bundles") or []
    prompt_refs = ref.get("promptRefs")
    skills = ref.get("requiredSkills")
    credential = ref.get("credentialRef")
    return {
        "kind": ref["kind"],
        "repoUrl": ref["repoUrl"],
        "commitId": root_commit,
        "ref": root_ref,
        "bundles": {
            "count": len(bundles),
            "items": [
                {
                    "name": item.get("name"),
                    "repoUrl": item.get("repoUrl") or ref["repoUrl"],
                    "commitId": item.get("commitId") or root_commit,
                    "ref": item.get("ref") or root_ref,
                    "subpath": item.get("subpath"),
                    "targetPath": item.get("targetPath"),
                    "valuesPrinted": False,
                }
                for item in bundles
            ],
            "valuesPrinted": False,
        },
        "promptRefs": {
            "count": len(prompt_refs or []),
            "names": [item["name"] for item in prompt_refs or []],
            "required": [item["name"] for item in prompt_refs or [] if item.get("required") is True],
            "valuesPrinted": False,
        },
        "requiredSkills": {
            "count": len(skills or []),
            "names": [item["name"] for item in skills or []],
            "valuesPrinted": False,
        },
        "submodules": ref.get("submodules", False),
        "lfs": ref.get("lfs", False),
        "credentialRef": (
            {
                "name": credential["name"],
                "namespace": credential.get("namespace"),
                "keys": credential.get("keys") or [],
                "valuesPrinted": False,
            }
            if credential
            else None
        ),
    }


def run_create(
    *,
    tenant_id: str,
    project_id: str,
    backend_profile: str,
    session_ref: dict | None = None,
    resource_bundle_ref: dict | None = None,
    provider_id: str | None = None,
    workspace_ref=None,
    execution_policy=None,
    metadata=None,
    extra: dict | None = None,
    idempotency_key: str | None = None,
) -> tuple[Run, bool]:
    """Create a pending run (and its session when the ref names a new one). Returns (run, created).

    Errors: 400 for an unknown backend or a malformed ref; 403 `tenant-policy-denied` / 400 when
    the session belongs to another tenant, project or backend; 409 when the idempotency key was
    used with another input. A repeated key with the same input returns the first run.
    """
    backends.require_profile(backend_profile)
    session_ref = validate_session_ref(session_ref)
    resource_bundle_ref = validate_resource_bundle_ref(resource_bundle_ref)
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
    payload_hash = stable_hash(dict(fields.items()))
    if idempotency_key:
        existing = _run_replay(tenant_id, project_id, idempotency_key, payload_hash)
        if existing is not None:
            return existing, False
    try:
        return _run_insert(fields, idempotency_key=idempotency_key, payload_hash=payload_hash), True
    except IntegrityError:
        # A concurrent create with the same key won the unique index: replay its run.
        existing = _run_replay(tenant_id, project_id, idempotency_key, payload_hash) if idempotency_key else None
        if existing is None:
            raise
        return existing, False


def _run_replay(tenant_id: str, project_id: str, idempotency_key: str, payload_hash: str) -> Run | None:
    existing = Run.objects.filter(tenant_id=tenant_id, project_id=project_id, idempotency_key=idempotency_key).first()
    if existing is not None and existing.payload_hash != payload_hash:
        raise conflict(
            SCHEMA_INVALID, "idempotency key reused with a different run input", idempotencyKey=idempotency_key
        )
    return existing


@write_transaction
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
    return run


@write_transaction
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


@write_transaction
def run_heartbeat(*, run_id: str, runner_id: str, lease_epoch: int, lease_ms: int, scope: Scope = UNRESTRICTED) -> Run:
    """Renew the holder's lease. A terminal run is returned unchanged, whoever asks.
    Errors: 404; 409 `runner-lease-conflict` for anyone but the holder at its current epoch."""
    run = _lock_run(run_id, scope)
    if run.is_terminal:
        return run
    _check_holder(run, runner_id, lease_epoch)
    _RunWrite(run).save(lease_expires_at=run.db_now + timedelta(milliseconds=lease_ms))
    return run


@write_transaction
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


@write_transaction
def run_cancel(*, run_id: str, reason: str | None = None, scope: Scope = UNRESTRICTED) -> Run:
    """Cancel the run and its open commands. A terminal run is returned unchanged. Error: 404."""
    run = _lock_run(run_id, scope)
    if run.is_terminal:
        return run
    reason = reason or DEFAULT_CANCEL_REASON
    return _end_run(
        _RunWrite(run), terminal_status=CANCELLED, failure_kind=CANCELLED, failure_message=reason, cancel_reason=reason
    )


@write_transaction
def run_expire(*, run_id: str, terminal_status: str, failure_kind: str, message: str) -> Run | None:
    """The reaper ends a run whose runner is gone or whose time is up, bumping the epoch so a
    runner that comes back is fenced out. Returns None when the run is already terminal."""
    run = _lock_run(run_id, UNRESTRICTED)
    if run.is_terminal:
        return None
    write = _RunWrite(run)
    run = _end_run(write, terminal_status=terminal_status, failure_kind=failure_kind, failure_message=message)
    Run.objects.filter(pk=run.pk).update(lease_epoch=run.lease_epoch + 1)
    run.lease_epoch += 1
    return run


# --- events --------------------------------------------------------------------------------


def validate_event(event_type, payload) -> None:
    if event_type not in EVENT_TYPES:
        raise invalid(
            f"unknown event type {event_type!r}" if isinstance(event_type, str) else "event type must be a string",
            field="type",
            allowed=sorted(EVENT_TYPES),
        )
    if not isinstance(payload, dict):
        raise invalid("event payload must be an object", field="payload")


@write_transaction(retry_unique=True)
def event_append(
    *,
    run_id: str,
    runner_id: str,
    lease_epoch: int,
    events: list[tuple[str, dict]],
    batch_key: str | None = None,
    scope: Scope = UNRESTRICTED,
) -> tuple[list[NewEvent | RunEvent], bool]:
    """Append a batch of runner events, all or none, with gapless seqs. Returns (events, created).

    The holder at the current epoch may append; after the run ended, its last holder may still
    flush. A repeated `batch_key` with the same events returns them and writes nothing.
    Errors: 400 for an unknown type or a non-object payload; 404; 409 `runner-lease-conflict`;
    409 `schema-invalid` for a batch key reused with other events.
    """
    for event_type, payload in events:
        validate_event(event_type, payload)
    batch_key = batch_key or None
    run, batch = _lock_run_for_append(run_id, scope, batch_key)
    _check_holder(run, runner_id, lease_epoch)
    extra_statements = []
    if batch_key:
        batch_hash = stable_hash([[event_type, payload] for event_type, payload in events])
        if batch is not None:
            payload_hash, first_seq, count = batch
            if payload_hash != batch_hash:
                raise conflict(SCHEMA_INVALID, "batchKey reused with different events", batchKey=batch_key)
            replay = RunEvent.objects.filter(run_id=run.id, seq__gte=first_seq, seq__lt=first_seq + count)
            return list(replay.order_by("seq")), False
        extra_statements.append(
            (
                "INSERT INTO runs_eventbatch (run_id, batch_key, payload_hash, first_seq, count, created_at) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                [run.id, batch_key, batch_hash, run.last_event_seq + 1, len(events), run.db_now],
            )
        )
    write = _RunWrite(run)
    for event_type, payload in events:
        write.emit(event_type, payload, posted=True)
    write.save(extra_statements=extra_statements)
    return write.events, True


# --- commands ------------------------------------------------------------------------------


@write_transaction
def command_create(
    *,
    run_id: str,
    command_type: str,
    payload: dict,
    idempotency_key: str | None = None,
    scope: Scope = UNRESTRICTED,
) -> tuple[Command, bool]:
    """Queue a command for the run's runner. Returns (command, created).

    A known idempotency key replays first, even after the run ended (A6); the hash covers
    {type, payload}. Errors: 400 for an unknown type, a non-object payload, or a steer to a
    backend that cannot steer; 404; 409 (the run's failure kind) on a terminal run; 409
    `schema-invalid` for a key reused with another command.
    """
    if command_type not in COMMAND_TYPES:
        raise invalid(f"unknown command type {command_type!r}", field="type", allowed=sorted(COMMAND_TYPES))
    if not isinstance(payload, dict):
        raise invalid("command payload must be an object", field="payload")
    idempotency_key = idempotency_key or None
    run = _lock_run(run_id, scope)
    payload_hash = stable_hash({"type": command_type, "payload": payload})
    if idempotency_key:
        existing = Command.objects.filter(run_id=run.id, idempotency_key=idempotency_key).first()
        if existing is not None:
            if existing.payload_hash != payload_hash:
                raise conflict(
                    SCHEMA_INVALID, "idempotency key reused with a different command", idempotencyKey=idempotency_key
                )
            return existing, False
    if run.is_terminal:
        raise _terminal_run_error(run)
    if command_type == "steer" and not backends.can(run.backend_profile, "steer"):
        raise invalid(f"backend {run.backend_profile} cannot steer", field="type", backendProfile=run.backend_profile)
    at = run.db_now
    command = Command(
        id=new_id("cmd"),
        run_id=run.id,
        seq=run.last_command_seq + 1,
        type=command_type,
        payload=payload,
        idempotency_key=idempotency_key,
        payload_hash=payload_hash,
        state=CommandState.PENDING,
        created_at=at,
        updated_at=at,
    )
    command.save(force_insert=True)
    if run.session_id:
        session_services.session_touch_command_created(
            session_id=run.session_id,
            run_id=run.id,
            command_id=command.id,
            command_type=command_type,
            payload=payload,
            at=at,
        )
    write = _RunWrite(run)
    write.emit("backend_status", {"phase": "command-created", "commandId": command.id, "commandType": command_type})
    # The seq counter is bookkeeping, not a change of the run: updatedAt stays.
    write.save(bookkeeping={"last_command_seq": command.seq})
    return command, True


def _lock_command(command_id: str, scope: Scope) -> tuple[Run, Command]:
    run_id = (
        Command.objects.filter(scope.q(tenant="run__tenant_id", project="run__project_id", run="run_id"), pk=command_id)
        .values_list("run_id", flat=True)
        .first()
    )
    if run_id is None:
        raise not_found("command", command_id)
    run = _lock_run(run_id, UNRESTRICTED)
    command = Command.objects.select_for_update(no_key=True).get(pk=command_id)
    return run, command


@write_transaction
def command_ack(*, command_id: str, runner_id: str, lease_epoch: int, scope: Scope = UNRESTRICTED) -> Command:
    """The runner took the command. A terminal or acknowledged command is returned unchanged.
    Errors: 404; 409 `runner-lease-conflict` for a stale holder or epoch."""
    run, command = _lock_command(command_id, scope)
    if command.is_terminal:
        return command
    _check_holder(run, runner_id, lease_epoch)
    if command.state == CommandState.ACKNOWLEDGED:
        return command
    at = run.db_now
    Command.objects.filter(pk=command.pk).update(state=CommandState.ACKNOWLEDGED, acknowledged_at=at, updated_at=at)
    command.state, command.acknowledged_at, command.updated_at = CommandState.ACKNOWLEDGED, at, at
    return command


@write_transaction
def command_finish(
    *,
    command_id: str,
    runner_id: str,
    lease_epoch: int,
    terminal_status: str,
    failure_kind: str | None = None,
    failure_message: str | None = None,
    thread_id: str | None = None,
    turn_id: str | None = None,
    scope: Scope = UNRESTRICTED,
) -> Command:
    """The runner ends the command; a terminal command is returned unchanged. A thread id is
    recorded on the session (`session-updated`), a turn's end ends the session's turn, then
    `command-terminal` is emitted. Errors: 404; 409 `runner-lease-conflict`."""
    run, command = _lock_command(command_id, scope)
    if command.is_terminal:
        return command
    _check_holder(run, runner_id, lease_epoch)
    write = _RunWrite(run)
    state = command_state_for(terminal_status)
    fields = {
        "state": state,
        "terminal_status": terminal_status,
        "failure_kind": failure_kind,
        "failure_message": failure_message,
        "thread_id": thread_id or None,
        "turn_id": turn_id or None,
        "updated_at": write.at,
    }
    Command.objects.filter(pk=command.pk).update(**fields)
    for name, value in fields.items():
        setattr(command, name, value)
    run_fields = {}
    if thread_id and run.session_id:
        run_fields["session_ref"] = _thread_update(write, thread_id=thread_id, turn_id=turn_id or None)
    if command.type == "turn" and run.session_id:
        session_services.session_touch_turn_ended(
            session_id=run.session_id,
            run_id=run.id,
            command_id=command.id,
            terminal_status=terminal_status,
            failure_kind=failure_kind,
            at=write.at,
        )
    write.emit(
        "backend_status",
        {
            "phase": "command-terminal",
            "commandId": command.id,
            "state": state,
            "terminalStatus": terminal_status,
            "failureKind": failure_kind,
            "message": failure_message,
            "threadId": thread_id or None,
            "turnId": turn_id or None,
        },
    )
    write.save(**run_fields)
    return command


@write_transaction
def command_cancel(*, command_id: str, reason: str | None = None, scope: Scope = UNRESTRICTED) -> Command:
    """Cancel one command (the run goes on). A terminal command is returned unchanged. Error: 404."""
    run, command = _lock_command(command_id, scope)
    if command.is_terminal:
        return command
    reason = reason or DEFAULT_CANCEL_REASON
    write = _RunWrite(run)
    fields = {
        "state": CommandState.CANCELLED,
        "terminal_status": CANCELLED,
        "failure_kind": CANCELLED,
        "failure_message": reason,
        "updated_at": write.at,
    }
    Command.objects.filter(pk=command.pk).update(**fields)
    for name, value in fields.items():
        setattr(command, name, value)
    write.emit(
        "backend_status",
        {
            "phase": "command-terminal",
            "commandId": command.id,
            "state": CommandState.CANCELLED,
            "terminalStatus": CANCELLED,
            "failureKind": CANCELLED,
            "message": reason,
        },
    )
    if command.type == "turn" and run.session_id:
        session_services.session_touch_turn_ended(
            session_id=run.session_id,
            run_id=run.id,
            command_id=command.id,
            terminal_status=CANCELLED,
            failure_kind=CANCELLED,
            at=write.at,
        )
    write.save()
    return command


# --- runners and runner jobs ---------------------------------------------------------------

_RUNNER_SERVER_FIELDS = {"id", "runnerId", "registeredAt", "heartbeatAt", "tenantId"}


@write_transaction
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
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO runs_runner (id, tenant_id, attributes, registered_at, heartbeat_at) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING RETURNING id",
            [runner_id, tenant_id, Jsonb(attributes), at, at],
        )
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
    idempotency_key = idempotency_key or None
    if not Run.objects.filter(scope.q(run="id"), pk=run_id).exists():
        raise not_found("run", run_id)
    if idempotency_key:
        existing = _runner_job_replay(run_id, idempotency_key, fields["payload_hash"])
        if existing is not None:
            return existing, False
    try:
        return _runner_job_write(
            run_id=run_id, fields=fields, job_id=job_id, idempotency_key=idempotency_key, scope=scope
        )
    except IntegrityError:
        existing = _runner_job_replay(run_id, idempotency_key, fields["payload_hash"]) if idempotency_key else None
        if existing is None:
            raise
        return existing, False


@write_transaction
def runner_job_update(*, job_id: str, **fields) -> None:
    """What the launcher learnt of a job it started (namespace, name, image, result)."""
    RunnerJob.objects.filter(pk=job_id).update(**fields, updated_at=db_now())


def _runner_job_replay(run_id: str, idempotency_key: str, payload_hash: str) -> RunnerJob | None:
    existing = RunnerJob.objects.filter(run_id=run_id, idempotency_key=idempotency_key).first()
    if existing is not None and existing.payload_hash != payload_hash:
        raise conflict(
            SCHEMA_INVALID, "runner job idempotency key reused with a different payload", idempotencyKey=idempotency_key
        )
    return existing


@write_transaction
def _runner_job_write(*, run_id: str, fields: dict, job_id: str | None, idempotency_key: str | None, scope: Scope):
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
