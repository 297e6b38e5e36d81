"""What a run's writes do to its session. Every function here is a step of a runs service's
transaction (`@in_transaction`): it relies on the run (and command) locks that service holds,
takes the session's row lock after them, and opens no transaction of its own."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

from django.db.models import BigIntegerField, F, Func
from psycopg import sql

from agentrun import counters
from agentrun.sqlnames import column, table
from agentrun.transactions import in_transaction
from agentrun.wire import parse_iso
from sessions.models import ExecutionState, Session, StorageKind
from sessions.services.locks import lock_inserted_session, lock_session, lock_session_or_claim_id
from sessions.services.refs import check_boundary, session_ref_from_record, title_from_metadata, title_from_prompt

# A touch moves the session in the inbox (its activity) without bumping its version, so it
# stamps `activity_version` with the next session counter value instead: commit-ordered like a
# version, it lets a walk of the inbox see the move (sessions.selectors). The function locks
# the session's row before it takes the counter (migration 0004).
TOUCH_VERSION_FUNCTION = "agent_sessions_touch_version"
TOUCH_VERSION = Func(F("session_id"), function=TOUCH_VERSION_FUNCTION, output_field=BigIntegerField())


@in_transaction
def session_resolve_for_run(
    *, session_ref: dict[str, Any], tenant_id: str, project_id: str, backend_profile: str, run_id: str, now: datetime
) -> dict[str, Any]:
    """The session a new run belongs to: the existing one (boundary checked, row locked, not
    rewritten) or a new one. Returns the run's ref. A concurrent creator of the same session
    loses the insert and is checked against the winner's row."""
    session = lock_session_or_claim_id(session_ref["sessionId"])
    if session is None:
        metadata = session_ref.get("metadata") or {}
        candidate = Session(
            session_id=session_ref["sessionId"],
            tenant_id=tenant_id,
            project_id=project_id,
            backend_profile=backend_profile,
            conversation_id=session_ref.get("conversationId") or None,
            thread_id=session_ref.get("threadId") or None,
            expires_at=parse_iso(session_ref.get("expiresAt"), field="sessionRef.expiresAt"),
            metadata=metadata,
            title=title_from_metadata(metadata),
            last_run_id=run_id,
            last_activity_at=now,
            created_at=now,
            updated_at=now,
            storage_kind=StorageKind.NONE,
            version=counters.next_version(counters.SESSIONS),
        )
        Session.objects.bulk_create([candidate], ignore_conflicts=True)
        session = lock_inserted_session(candidate.session_id)
        # Versions are unique: the row carries ours only if our insert won.
        if session.version == candidate.version:
            return session_ref_from_record(session, session_ref)
    check_boundary(session, tenant_id=tenant_id, project_id=project_id, backend_profile=backend_profile)
    # createRun's touch of an existing session: lastRunId and activity, no version bump.
    Session.objects.filter(pk=session.pk).update(
        last_run_id=run_id, last_activity_at=now, updated_at=now, activity_version=TOUCH_VERSION
    )
    session.last_run_id = run_id
    return session_ref_from_record(session, session_ref)


_EVENT_TOUCH_FIELDS = ("last_event_seq", "last_activity_at", "updated_at", "activity_version", "session_id")


def session_event_touch_sql(*, session_id: str, last_event_seq: int, at: datetime) -> tuple[sql.Composed, list[Any]]:
    """Every appended event touches its session: lastEventSeq and activity, no version bump
    (the touch's stamp instead). A statement, not a write: the append sends it with its own
    writes, in its own transaction, in one round trip."""
    return _event_touch_statement(), [last_event_seq, at, at, session_id]


@functools.cache
def _event_touch_statement() -> sql.Composed:
    """Composed once: the append caches its statement by the identity of its parts."""
    names = {name: column(Session, name) for name in _EVENT_TOUCH_FIELDS}
    # Raw: the append's hot path; an ORM update would be a round trip of its own.
    return sql.SQL(
        "UPDATE {table} SET {last_event_seq} = %s, {last_activity_at} = %s, {updated_at} = %s, "
        "{activity_version} = {touch}({session_id}) WHERE {session_id} = %s"
    ).format(table=table(Session), touch=sql.Identifier(TOUCH_VERSION_FUNCTION), **names)


@in_transaction
def session_touch_command_created(
    *, session_id: str, run_id: str, command_id: str, command_type: str, payload: dict[str, Any], at: datetime
) -> None:
    """A new turn makes the session running with a fresh title; a steer keeps the turn's pointers."""
    fields: dict[str, Any]
    if command_type == "turn":
        fields = {
            "execution_state": ExecutionState.RUNNING,
            "last_run_id": run_id,
            "last_command_id": command_id,
            "active_run_id": run_id,
            "active_command_id": command_id,
            "terminal_status": None,
            "failure_kind": None,
        }
        title = title_from_prompt(payload)
        if title is not None:  # A22: a prompt without a title keeps the old one
            fields["title"] = title
    elif command_type == "steer":
        fields = {"last_run_id": run_id, "last_command_id": command_id, "active_run_id": run_id}
    else:
        return
    if lock_session(session_id) is None:
        return
    Session.objects.filter(pk=session_id).update(
        **fields, last_activity_at=at, updated_at=at, version=counters.next_version(counters.SESSIONS)
    )


@in_transaction
def session_touch_claimed(*, session_id: str, run_id: str, at: datetime) -> None:
    """A claim points the session at its run (the trace's default) without making it active (A13)."""
    Session.objects.filter(pk=session_id).update(
        active_run_id=run_id, last_run_id=run_id, last_activity_at=at, updated_at=at, activity_version=TOUCH_VERSION
    )


@in_transaction
def session_touch_turn_ended(
    *, session_id: str, run_id: str, command_id: str, terminal_status: str, failure_kind: str | None, at: datetime
) -> None:
    """A turn ended. Only when the session still points at that turn does it become terminal and
    lose its active pointers (A5): a late finish of an old turn must not end a newer one."""
    session = lock_session(session_id)
    if session is None:
        return
    if session.active_command_id != command_id:
        Session.objects.filter(pk=session_id).update(last_activity_at=at, updated_at=at, activity_version=TOUCH_VERSION)
        return
    Session.objects.filter(pk=session_id).update(
        execution_state=ExecutionState.TERMINAL,
        active_run_id=None,
        active_command_id=None,
        last_run_id=run_id,
        last_command_id=command_id,
        terminal_status=terminal_status,
        failure_kind=failure_kind,
        last_activity_at=at,
        updated_at=at,
        version=counters.next_version(counters.SESSIONS),
    )


@in_transaction
def session_touch_run_ended(
    *, session_id: str, run_id: str, terminal_status: str, failure_kind: str | None, at: datetime
) -> None:
    """A run ended. Conditional like a turn's end (A5); a session that never had a turn stays
    idle (A13), though it loses its pointer to the run."""
    session = lock_session(session_id)
    if session is None:
        return
    if session.active_run_id != run_id:
        Session.objects.filter(pk=session_id).update(last_activity_at=at, updated_at=at, activity_version=TOUCH_VERSION)
        return
    fields: dict[str, Any] = {"active_run_id": None, "active_command_id": None, "last_run_id": run_id}
    if session.execution_state != ExecutionState.IDLE:
        fields.update(
            execution_state=ExecutionState.TERMINAL, terminal_status=terminal_status, failure_kind=failure_kind
        )
    Session.objects.filter(pk=session_id).update(
        **fields, last_activity_at=at, updated_at=at, version=counters.next_version(counters.SESSIONS)
    )


@in_transaction
def session_thread_update(
    *,
    run_session_ref: dict[str, Any],
    tenant_id: str,
    project_id: str,
    backend_profile: str,
    run_id: str,
    thread_id: str,
    turn_id: str | None,
    at: datetime,
) -> dict[str, Any]:
    """A finished turn or run reported its thread. Only the thread fields, metadata.lastTurnId,
    activity and version change (A4): storage and the rest of the row are kept. Returns the
    run's new ref."""
    session_id = run_session_ref["sessionId"]
    session = lock_session(session_id)
    if session is None:
        # The row was removed under the run: build it again from the run, like the seed.
        metadata = dict(run_session_ref.get("metadata") or {})
        session = Session(
            session_id=session_id,
            tenant_id=tenant_id,
            project_id=project_id,
            backend_profile=backend_profile,
            conversation_id=run_session_ref.get("conversationId") or None,
            expires_at=parse_iso(run_session_ref.get("expiresAt"), field="sessionRef.expiresAt"),
            metadata=metadata,
            title=title_from_metadata(metadata),
            last_run_id=run_id,
            created_at=at,
            version=0,
        )
    metadata = dict(session.metadata or {})
    if turn_id:
        metadata["lastTurnId"] = turn_id
    session.thread_id = thread_id
    session.conversation_id = session.conversation_id or run_session_ref.get("conversationId") or None
    if session.expires_at is None and run_session_ref.get("expiresAt"):
        session.expires_at = parse_iso(run_session_ref["expiresAt"], field="sessionRef.expiresAt")
    session.metadata = metadata
    session.last_activity_at = at
    session.updated_at = at
    session.version = counters.next_version(counters.SESSIONS)
    session.save()
    return session_ref_from_record(session, run_session_ref)
