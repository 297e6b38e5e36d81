"""A session's storage: what runners report of it, its eviction, and its collection (gc_sessions
and the admin delete an expired session's PVC)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from agentrun import counters
from agentrun.auth import Scope
from agentrun.clock import db_now
from agentrun.errors import SCHEMA_INVALID, conflict, invalid
from agentrun.kube import KubeError
from agentrun.transactions import write_transaction
from sessions.models import Session, StorageKind
from sessions.services.locks import lock_scoped_session

UNRESTRICTED = Scope.unrestricted()
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
    scope: Scope = UNRESTRICTED,
) -> Session:
    """A runner reports the session's storage. Every storage field is replaced (absent ones
    become null); the rollout subdir falls back to the current one, then `sessions`. A PVC
    again after an eviction is no longer evicted (A15)."""
    if storage_kind not in StorageKind.values:
        raise invalid(f"storageKind must be one of {', '.join(StorageKind.values)}", field="storageKind")
    session = lock_scoped_session(session_id, scope)
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
def session_storage_evict(*, session_id: str, pvc_name: str, scope: Scope = UNRESTRICTED) -> Session:
    """The session's PVC is gone. Only when `pvc_name` is still the session's PVC (A15): a stale
    eviction must not clobber a newer volume. Evicting the same PVC again changes nothing."""
    session = lock_scoped_session(session_id, scope)
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


class StorageOutcome:
    DELETED = "deleted"  # the PVC was deleted and the session marked evicted
    ABSENT = "absent"  # the PVC was already gone; the session is marked evicted all the same
    SKIPPED = "skipped"  # someone else holds or already collected the session
    FAILED = "failed"  # the Kubernetes API refused; the session is unchanged


@write_transaction(durable=True)
def session_storage_collect(
    *,
    session_id: str,
    delete_pvc: Callable[[str, str], bool],
    default_namespace: str,
    expired_at: datetime | None = None,
) -> tuple[str, str]:
    """Delete a session's PVC and mark the session evicted, under the session's row lock, so two
    collectors never both delete it (the second skips the locked row, then finds it evicted).
    `delete_pvc(namespace, name)` returns True when it deleted, False when the PVC was already
    gone, and raises otherwise. With `expired_at`, only a session expired by then is collected.
    Returns (outcome, detail)."""
    sessions = (
        Session.objects.select_for_update(no_key=True, skip_locked=True)
        .filter(pk=session_id, storage_kind=StorageKind.PVC)
        .exclude(storage_pvc_name__isnull=True)
        .exclude(storage_pvc_name="")
    )
    if expired_at is not None:
        sessions = sessions.filter(expires_at__lte=expired_at)
    session = sessions.first()
    if session is None or session.storage_pvc_name is None:
        return StorageOutcome.SKIPPED, "not a collectable PVC session (or another collector holds it)"
    namespace = session.storage_namespace or default_namespace
    try:
        deleted = delete_pvc(namespace, session.storage_pvc_name)
    except KubeError as exc:
        return StorageOutcome.FAILED, f"{namespace}/{session.storage_pvc_name}: {exc}"
    _mark_evicted(session, db_now())
    return (StorageOutcome.DELETED if deleted else StorageOutcome.ABSENT), f"{namespace}/{session.storage_pvc_name}"
