"""The session API's writes: a session's record (PUT) and a reader's read of it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from agentrun import counters
from agentrun.auth import Scope
from agentrun.clock import db_now
from agentrun.errors import not_found
from agentrun.readcursors import upsert_read_cursor
from agentrun.transactions import write_transaction
from sessions.models import Session, SessionReadCursor
from sessions.services.locks import lock_inserted_session, lock_session_or_claim_id
from sessions.services.refs import check_boundary, title_from_metadata


@write_transaction(durable=True)
def session_upsert(
    *,
    session_id: str,
    tenant_id: str,
    project_id: str,
    backend_profile: str,
    conversation_id: str | None = None,
    thread_id: str | None = None,
    metadata: dict[str, Any] | None = None,
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
        session = lock_inserted_session(session_id)
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
    """The reader has seen the session as it is now. The session itself does not change. 404 for
    a session the key cannot see.

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
