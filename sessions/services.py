"""Every write to sessions. Runs call these inside their own transactions (plain `atomic`)."""

from __future__ import annotations

import re
from datetime import datetime

from django.db import connection, transaction
from django.db.models import BigIntegerField, F, Func
from psycopg import sql

from agentrun import counters
from agentrun.auth import Scope
from agentrun.clock import db_now
from agentrun.errors import SCHEMA_INVALID, TENANT_POLICY_DENIED, AgentRunError, conflict, invalid, not_found
from agentrun.kube import KubeError
from agentrun.readcursors import upsert_read_cursor
from agentrun.transactions import write_transaction
from agentrun.wire import iso, parse_iso
from sessions.models import ExecutionState, Session, SessionReadCursor, StorageKind

_WHITESPACE = re.compile(r"\s+")
# A touch moves the session in the inbox (its activity) without bumping its version, so it
# stamps `activity_version` with the next session counter value instead: commit-ordered like a
# version, it lets a walk of the inbox see the move (sessions.selectors). The function locks
# the session's row before it takes the counter (migration 0004).
TOUCH_VERSION_FUNCTION = "agent_sessions_touch_version"
TOUCH_VERSION = Func(F("session_id"), function=TOUCH_VERSION_FUNCTION, output_field=BigIntegerField())


def title_from_metadata(metadata) -> str | None:
    """SPEC §4.9: metadata.title trimmed, at most 200 characters; else None."""
    title = metadata.get("title") if isinstance(metadata, dict) else None
    if isinstance(title, str) and title.strip():
        return title.strip()[:200]
    return None


def title_from_prompt(payload) -> str | None:
    """SPEC §4.9: the prompt trimmed, whitespace runs folded, at most 120 characters; else None."""
    prompt = payload.get("prompt") if isinstance(payload, dict) else None
    if not isinstance(prompt, str):
        return None
    return _WHITESPACE.sub(" ", prompt.strip())[:120] or None


def session_ref_from_record(session: Session, fallback: dict | None) -> dict:
    """SPEC §4.8: the record's values, gaps filled from the fallback ref, absent keys left out."""
    fallback = fallback or {}
    ref = {"sessionId": session.session_id}
    for key, value in (
        ("conversationId", session.conversation_id),
        ("threadId", session.thread_id),
        ("expiresAt", iso(session.expires_at)),
    ):
        if value:
            ref[key] = value
        elif fallback.get(key):
            ref[key] = fallback[key]
    if session.metadata:
        ref["metadata"] = session.metadata
    elif "metadata" in fallback and fallback["metadata"] is not None:
        ref["metadata"] = fallback["metadata"]
    return ref


def summarize_session_ref(ref: dict | None) -> dict | None:
    """SPEC §4.11: what an event may say of a session ref (metadata keys, never values)."""
    if not ref:
        return None
    metadata = ref.get("metadata") or {}
    return {
        "sessionId": ref["sessionId"],
        "conversationId": ref.get("conversationId"),
        "threadId": ref.get("threadId"),
        "expiresAt": ref.get("expiresAt"),
        "metadataKeys": sorted(metadata) if isinstance(metadata, dict) else [],
        "valuesPrinted": False,
    }


def check_boundary(session: Session, *, tenant_id: str, project_id: str, backend_profile: str) -> None:
    """SPEC §4.3: another tenant or project is 403; another backend is 400. Tenant first."""
    if session.tenant_id != tenant_id or session.project_id != project_id:
        raise AgentRunError(
            TENANT_POLICY_DENIED,
            "sessionRef cannot be reused across tenant or project boundary",
            status=403,
            details={"sessionId": session.session_id, "valuesPrinted": False},
        )
    if session.backend_profile != backend_profile:
        raise AgentRunError(
            SCHEMA_INVALID,
            "sessionRef cannot be reused across backendProfile boundary",
            status=400,
            details={
                "sessionId": session.session_id,
                "existingBackendProfile": session.backend_profile,
                "requestedBackendProfile": backend_profile,
                "valuesPrinted": False,
            },
        )


def lock_session(session_id: str) -> Session | None:
    return Session.objects.select_for_update(no_key=True).filter(pk=session_id).first()


def lock_session_or_claim_id(session_id: str) -> Session | None:
    """The session, row-locked; or None, and then this transaction alone may create it.

    Creators of one new id queue on an advisory lock of the id before they take the version
    counter. Without it, a creator holding the counter could wait for the row lock of a session
    another creator had just committed, while that row's new holder waits for the counter."""
    session = lock_session(session_id)
    if session is not None:
        return session
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext('agentrun-session'), hashtext(%s))", [session_id])
    return lock_session(session_id)


def _lock_scoped(session_id: str, scope: Scope) -> Session:
    """The session, row-locked, if the key may see it (another tenant's or project's is 404). A
    run-scoped key reaches only the session its run is the current or last run of."""
    session = Session.objects.select_for_update(no_key=True).filter(scope.q(), pk=session_id).first()
    if session is None or (
        scope.run_id is not None and scope.run_id not in (session.active_run_id, session.last_run_id)
    ):
        raise not_found("session", session_id)
    return session


def session_resolve_for_run(
    *, session_ref: dict, tenant_id: str, project_id: str, backend_profile: str, run_id: str, now: datetime
) -> dict:
    """The session a new run belongs to: the existing one (boundary checked, row locked, not
    rewritten) or a new one. Returns the run's ref. A concurrent creator of the same session
    loses the insert and is checked against the winner's row."""
    with transaction.atomic():
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
            session = lock_session(candidate.session_id)
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


def session_event_touch_sql(*, session_id: str, last_event_seq: int, at: datetime) -> tuple[sql.Composed, list]:
    """Every appended event touches its session: lastEventSeq and activity, no version bump
    (the touch's stamp instead). As a statement, so the append can send it with its own writes
    in one round trip (the append's hot path: an ORM update would be a second one)."""
    column = {name: sql.Identifier(Session._meta.get_field(name).column) for name in _EVENT_TOUCH_FIELDS}
    statement = sql.SQL(
        "UPDATE {table} SET {last_event_seq} = %s, {last_activity_at} = %s, {updated_at} = %s, "
        "{activity_version} = {touch}({session_id}) WHERE {session_id} = %s"
    ).format(table=sql.Identifier(Session._meta.db_table), touch=sql.Identifier(TOUCH_VERSION_FUNCTION), **column)
    return statement, [last_event_seq, at, at, session_id]


_EVENT_TOUCH_FIELDS = ("last_event_seq", "last_activity_at", "updated_at", "activity_version", "session_id")


def session_touch_command_created(
    *, session_id: str, run_id: str, command_id: str, command_type: str, payload: dict, at: datetime
) -> None:
    """A new turn makes the session running with a fresh title; a steer keeps the turn's pointers."""
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
    with transaction.atomic():
        if lock_session(session_id) is None:
            return
        Session.objects.filter(pk=session_id).update(
            **fields, last_activity_at=at, updated_at=at, version=counters.next_version(counters.SESSIONS)
        )


def session_touch_claimed(*, session_id: str, run_id: str, at: datetime) -> None:
    """A claim points the session at its run (the trace's default) without making it active (A13)."""
    Session.objects.filter(pk=session_id).update(
        active_run_id=run_id, last_run_id=run_id, last_activity_at=at, updated_at=at, activity_version=TOUCH_VERSION
    )


def session_touch_turn_ended(
    *, session_id: str, run_id: str, command_id: str, terminal_status: str, failure_kind: str | None, at: datetime
) -> None:
    """A turn ended. Only when the session still points at that turn does it become terminal and
    lose its active pointers (A5): a late finish of an old turn must not end a newer one."""
    with transaction.atomic():
        session = lock_session(session_id)
        if session is None:
            return
        if session.active_command_id != command_id:
            Session.objects.filter(pk=session_id).update(
                last_activity_at=at, updated_at=at, activity_version=TOUCH_VERSION
            )
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


def session_touch_run_ended(
    *, session_id: str, run_id: str, terminal_status: str, failure_kind: str | None, at: datetime
) -> None:
    """A run ended. Conditional like a turn's end (A5); a session that never had a turn stays
    idle (A13), though it loses its pointer to the run."""
    with transaction.atomic():
        session = lock_session(session_id)
        if session is None:
            return
        if session.active_run_id != run_id:
            Session.objects.filter(pk=session_id).update(
                last_activity_at=at, updated_at=at, activity_version=TOUCH_VERSION
            )
            return
        fields = {"active_run_id": None, "active_command_id": None, "last_run_id": run_id}
        if session.execution_state != ExecutionState.IDLE:
            fields.update(
                execution_state=ExecutionState.TERMINAL, terminal_status=terminal_status, failure_kind=failure_kind
            )
        Session.objects.filter(pk=session_id).update(
            **fields, last_activity_at=at, updated_at=at, version=counters.next_version(counters.SESSIONS)
        )


def session_thread_update(
    *,
    run_session_ref: dict,
    tenant_id: str,
    project_id: str,
    backend_profile: str,
    run_id: str,
    thread_id: str,
    turn_id: str | None,
    at: datetime,
) -> dict:
    """A finished turn or run reported its thread. Only the thread fields, metadata.lastTurnId,
    activity and version change (A4): storage and the rest of the row are kept. Returns the
    run's new ref."""
    session_id = run_session_ref["sessionId"]
    with transaction.atomic():
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


# --- the session API -----------------------------------------------------------------------


@write_transaction(durable=True)
def session_upsert(
    *,
    session_id: str,
    tenant_id: str,
    project_id: str,
    backend_profile: str,
    conversation_id: str | None = None,
    thread_id: str | None = None,
    metadata: dict | None = None,
    expires_at: datetime | None = None,
    codex_rollout_subdir: str | None = None,
) -> tuple[Session, bool]:
    """PUT a session: create it, or overwrite its descriptive fields. Returns (session, created).

    The boundary of §4.3 holds here too (A11): a session of another tenant or project is 403,
    of another backend 400. Every write takes the next global version (A1). A new session gets
    the defaults of every creation path (A9): title from metadata, activity now. An update keeps
    the run state, activity and storage, and the title unless the metadata brings one."""
    metadata = metadata or {}
    at = db_now()
    session = lock_session_or_claim_id(session_id)
    if session is None:
        candidate = Session(
            session_id=session_id,
            tenant_id=tenant_id,
            project_id=project_id,
            backend_profile=backend_profile,
            conversation_id=conversation_id or None,
            thread_id=thread_id or None,
            metadata=metadata,
            expires_at=expires_at,
            codex_rollout_subdir=codex_rollout_subdir or None,
            title=title_from_metadata(metadata),
            last_activity_at=at,
            created_at=at,
            updated_at=at,
            version=counters.next_version(counters.SESSIONS),
        )
        Session.objects.bulk_create([candidate], ignore_conflicts=True)
        session = lock_session(session_id)
        if session.version == candidate.version:
            return session, True
    check_boundary(session, tenant_id=tenant_id, project_id=project_id, backend_profile=backend_profile)
    session.conversation_id = conversation_id or None
    session.thread_id = thread_id or None
    session.metadata = metadata
    session.expires_at = expires_at
    session.codex_rollout_subdir = codex_rollout_subdir or None
    session.title = title_from_metadata(metadata) or session.title
    session.updated_at = at
    session.version = counters.next_version(counters.SESSIONS)
    session.save(
        update_fields=[
            "conversation_id",
            "thread_id",
            "metadata",
            "expires_at",
            "codex_rollout_subdir",
            "title",
            "updated_at",
            "version",
        ]
    )
    return session, False


@write_transaction(durable=True)
def session_mark_read(*, session_id: str, reader_id: str, scope: Scope) -> SessionReadCursor:
    """The reader has seen the session as it is now. The session itself does not change.

    The cursor is stamped with the next session counter value (`read_version`): the read moves
    the session in this reader's inbox, and a walk of it must see that the move came after it
    began. The counter comes after the cursor's row lock and a read locks no session, so reads
    and session writes never wait for each other in a cycle."""
    session = Session.objects.filter(scope.q(), pk=session_id).only("version").first()
    if session is None:
        raise not_found("session", session_id)
    cursor = upsert_read_cursor(
        SessionReadCursor,
        owner_field="session",
        version_field="session_version",
        owner_id=session_id,
        reader_id=reader_id,
        version=session.version,
    )
    cursor.read_version = counters.next_version(counters.SESSIONS)
    SessionReadCursor.objects.filter(session_id=session_id, reader_id=reader_id).update(
        read_version=cursor.read_version
    )
    return cursor


STORAGE_FIELDS = (
    "storage_pvc_name",
    "storage_namespace",
    "storage_pvc_phase",
    "storage_size_bytes",
    "storage_files_count",
    "storage_sha256",
)


@write_transaction(durable=True)
def session_storage_refresh(
    *,
    session_id: str,
    storage_kind: str,
    pvc_name: str | None = None,
    namespace: str | None = None,
    pvc_phase: str | None = None,
    size_bytes: int | None = None,
    files_count: int | None = None,
    sha256: str | None = None,
    codex_rollout_subdir: str | None = None,
    scope: Scope = Scope.unrestricted(),
) -> Session:
    """A runner reports the session's storage. Every storage field is replaced (absent ones
    become null); the rollout subdir falls back to the current one, then `sessions`. A PVC
    again after an eviction is no longer evicted (A15)."""
    if storage_kind not in StorageKind.values:
        raise invalid(f"storageKind must be one of {', '.join(StorageKind.values)}", field="storageKind")
    session = _lock_scoped(session_id, scope)
    at = db_now()
    values = dict(zip(STORAGE_FIELDS, (pvc_name, namespace, pvc_phase, size_bytes, files_count, sha256), strict=True))
    for field, value in values.items():
        setattr(session, field, value)
    session.storage_kind = storage_kind
    session.codex_rollout_subdir = codex_rollout_subdir or session.codex_rollout_subdir or "sessions"
    if storage_kind == StorageKind.PVC:
        session.storage_evicted_at = None
    session.storage_updated_at = session.updated_at = at
    session.version = counters.next_version(counters.SESSIONS)
    session.save(
        update_fields=[
            *STORAGE_FIELDS,
            "storage_kind",
            "codex_rollout_subdir",
            "storage_evicted_at",
            "storage_updated_at",
            "updated_at",
            "version",
        ]
    )
    return session


def _mark_evicted(session: Session, at: datetime) -> None:
    session.storage_kind = StorageKind.EVICTED
    session.storage_evicted_at = session.storage_updated_at = session.updated_at = at
    session.version = counters.next_version(counters.SESSIONS)
    session.save(update_fields=["storage_kind", "storage_evicted_at", "storage_updated_at", "updated_at", "version"])


@write_transaction(durable=True)
def session_storage_evict(*, session_id: str, pvc_name: str, scope: Scope = Scope.unrestricted()) -> Session:
    """The session's PVC is gone. Only when `pvc_name` is still the session's PVC (A15): a stale
    eviction must not clobber a newer volume. Evicting the same PVC again changes nothing."""
    session = _lock_scoped(session_id, scope)
    if session.storage_pvc_name != pvc_name:
        raise conflict(
            SCHEMA_INVALID,
            "pvcName is not the session's current PVC",
            sessionId=session_id,
            currentPvcName=session.storage_pvc_name,
            requestedPvcName=pvc_name,
        )
    if session.storage_kind != StorageKind.EVICTED:
        _mark_evicted(session, db_now())
    return session


# --- storage collection (gc_sessions and the admin) -----------------------------------------


class StorageOutcome:
    DELETED = "deleted"  # the PVC was deleted and the session marked evicted
    ABSENT = "absent"  # the PVC was already gone; the session is marked evicted all the same
    SKIPPED = "skipped"  # someone else holds or already collected the session
    FAILED = "failed"  # the Kubernetes API refused; the session is unchanged


def session_storage_collect(*, session_id: str, delete_pvc, default_namespace: str, expired_at=None) -> tuple[str, str]:
    """Delete a session's PVC and mark the session evicted, under the session's row lock, so two
    collectors never both delete it (the second skips the locked row, then finds it evicted).
    `delete_pvc(namespace, name)` returns True when it deleted, False when the PVC was already
    gone, and raises otherwise. With `expired_at`, only a session expired by then is collected.
    Returns (outcome, detail)."""
    with transaction.atomic(durable=True):
        sessions = (
            Session.objects.select_for_update(no_key=True, skip_locked=True)
            .filter(pk=session_id, storage_kind=StorageKind.PVC)
            .exclude(storage_pvc_name__isnull=True)
            .exclude(storage_pvc_name="")
        )
        if expired_at is not None:
            sessions = sessions.filter(expires_at__lte=expired_at)
        session = sessions.first()
        if session is None:
            return StorageOutcome.SKIPPED, "not a collectable PVC session (or another collector holds it)"
        namespace = session.storage_namespace or default_namespace
        try:
            deleted = delete_pvc(namespace, session.storage_pvc_name)
        except KubeError as exc:
            return StorageOutcome.FAILED, f"{namespace}/{session.storage_pvc_name}: {exc}"
        _mark_evicted(session, db_now())
        return (StorageOutcome.DELETED if deleted else StorageOutcome.ABSENT), f"{namespace}/{session.storage_pvc_name}"
