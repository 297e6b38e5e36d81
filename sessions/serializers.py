"""Session bodies in, session summaries and read cursors out (camelCase, as the seed's records)."""

from __future__ import annotations

from rest_framework import serializers

from agentrun.fields import (
    BIGINT_MAX,
    IDENTIFIER_MAX_LENGTH,
    SESSION_ID_MAX_LENGTH,
    IdentifierField,
    JSONObjectField,
    StrictCharField,
    StrictIntegerField,
)
from agentrun.openapi import CURSOR_MAX_LENGTH, PAGE_TOKEN_MAX_LENGTH, BackendProfileField
from agentrun.wire import MAX_INTEGER_TEXT, iso
from sessions.models import ExecutionState, Session, StorageKind
from sessions.selectors import STATES

# `tenantId/projectId/sessionId`.
SESSION_PATH_MAX_LENGTH = 2 * IDENTIFIER_MAX_LENGTH + SESSION_ID_MAX_LENGTH + 2


class SessionPutIn(serializers.Serializer):
    sessionId = IdentifierField(required=False, max_length=SESSION_ID_MAX_LENGTH)
    tenantId = IdentifierField(required=False, allow_null=True, max_length=200)
    projectId = IdentifierField(required=False, allow_null=True, max_length=200)
    backendProfile = BackendProfileField(max_length=32)
    conversationId = IdentifierField(required=False, allow_null=True, allow_blank=True, max_length=500)
    threadId = IdentifierField(required=False, allow_null=True, allow_blank=True, max_length=500)
    metadata = JSONObjectField(required=False, allow_null=True)
    expiresAt = StrictCharField(required=False, allow_null=True, max_length=64, help_text="ISO-8601.")
    codexRolloutSubdir = StrictCharField(required=False, allow_null=True, allow_blank=True, max_length=500)


class ReadIn(serializers.Serializer):
    readerId = IdentifierField(max_length=200)


class StorageIn(serializers.Serializer):
    storageKind = serializers.ChoiceField(choices=StorageKind.values)
    pvcName = IdentifierField(required=False, allow_null=True, max_length=253)
    storageNamespace = IdentifierField(required=False, allow_null=True, max_length=253)
    pvcPhase = StrictCharField(required=False, allow_null=True, max_length=64)
    storageSizeBytes = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=BIGINT_MAX)
    storageFilesCount = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=BIGINT_MAX)
    storageSha256 = StrictCharField(required=False, allow_null=True, max_length=64)
    codexRolloutSubdir = StrictCharField(required=False, allow_null=True, allow_blank=True, max_length=500)


class EvictIn(serializers.Serializer):
    pvcName = IdentifierField(max_length=253)


class ReadCursorOut(serializers.Serializer):
    sessionId = serializers.CharField(max_length=SESSION_ID_MAX_LENGTH)
    readerId = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    sessionVersion = serializers.IntegerField(min_value=0)
    readAt = serializers.DateTimeField()

    def to_representation(self, cursor):
        return {
            "sessionId": cursor.session_id,
            "readerId": cursor.reader_id,
            "sessionVersion": cursor.session_version,
            "readAt": iso(cursor.read_at),
        }


def render_cursor(session_id: str, reader_id: str | None, version, read_at) -> dict | None:
    if reader_id is None or version is None:
        return None
    return {"sessionId": session_id, "readerId": reader_id, "sessionVersion": version, "readAt": iso(read_at)}


class SessionOut(serializers.Serializer):
    """The session record plus its attention (SPEC §1.5 SessionSummary, §4.7 with A13)."""

    sessionId = serializers.CharField(max_length=SESSION_ID_MAX_LENGTH)
    tenantId = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    projectId = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    backendProfile = serializers.CharField(max_length=32)
    conversationId = serializers.CharField(allow_null=True, max_length=500)
    threadId = serializers.CharField(allow_null=True, max_length=500)
    metadata = serializers.JSONField()
    version = serializers.IntegerField(min_value=0)
    executionState = serializers.ChoiceField(choices=ExecutionState.values)
    lastRunId = serializers.CharField(allow_null=True, max_length=64)
    lastCommandId = serializers.CharField(allow_null=True, max_length=64)
    activeRunId = serializers.CharField(allow_null=True, max_length=64)
    activeCommandId = serializers.CharField(allow_null=True, max_length=64)
    lastEventSeq = serializers.IntegerField(min_value=0)
    terminalStatus = serializers.CharField(allow_null=True, max_length=32)
    failureKind = serializers.CharField(allow_null=True, max_length=64)
    title = serializers.CharField(allow_null=True, max_length=200)
    summary = serializers.JSONField()
    lastActivityAt = serializers.DateTimeField(allow_null=True)
    createdAt = serializers.DateTimeField()
    updatedAt = serializers.DateTimeField()
    expiresAt = serializers.DateTimeField(allow_null=True)
    storageKind = serializers.ChoiceField(choices=StorageKind.values)
    storagePvcName = serializers.CharField(allow_null=True, max_length=253)
    storageNamespace = serializers.CharField(allow_null=True, max_length=253)
    storagePvcPhase = serializers.CharField(allow_null=True, max_length=64)
    storageSizeBytes = serializers.IntegerField(allow_null=True, min_value=0)
    storageFilesCount = serializers.IntegerField(allow_null=True, min_value=0)
    storageSha256 = serializers.CharField(allow_null=True, max_length=64)
    storageUpdatedAt = serializers.DateTimeField(allow_null=True)
    storageEvictedAt = serializers.DateTimeField(allow_null=True)
    codexRolloutSubdir = serializers.CharField(allow_null=True, max_length=500)
    sessionPath = serializers.CharField(max_length=SESSION_PATH_MAX_LENGTH, help_text="`tenantId/projectId/sessionId`.")
    readerId = serializers.CharField(allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    readCursor = ReadCursorOut(allow_null=True)
    attentionState = serializers.ChoiceField(choices=["active", "unread", "read"])
    unread = serializers.BooleanField()
    active = serializers.BooleanField()

    def __init__(self, *args, reader_id: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reader_id = reader_id

    def to_representation(self, session: Session):
        version = getattr(session, "cursor_version", None)
        read_cursor = render_cursor(
            session.session_id, self.reader_id, version, getattr(session, "cursor_read_at", None)
        )
        active = session.active
        unread = not active and (read_cursor is None or version < session.version)
        return {
            "sessionId": session.session_id,
            "tenantId": session.tenant_id,
            "projectId": session.project_id,
            "backendProfile": session.backend_profile,
            "conversationId": session.conversation_id,
            "threadId": session.thread_id,
            "metadata": session.metadata,
            "version": session.version,
            "executionState": session.execution_state,
            "lastRunId": session.last_run_id,
            "lastCommandId": session.last_command_id,
            "activeRunId": session.active_run_id,
            "activeCommandId": session.active_command_id,
            "lastEventSeq": session.last_event_seq,
            "terminalStatus": session.terminal_status,
            "failureKind": session.failure_kind,
            "title": session.title,
            "summary": session.summary,
            "lastActivityAt": iso(session.last_activity_at),
            "createdAt": iso(session.created_at),
            "updatedAt": iso(session.updated_at),
            "expiresAt": iso(session.expires_at),
            "storageKind": session.storage_kind,
            "storagePvcName": session.storage_pvc_name,
            "storageNamespace": session.storage_namespace,
            "storagePvcPhase": session.storage_pvc_phase,
            "storageSizeBytes": session.storage_size_bytes,
            "storageFilesCount": session.storage_files_count,
            "storageSha256": session.storage_sha256,
            "storageUpdatedAt": iso(session.storage_updated_at),
            "storageEvictedAt": iso(session.storage_evicted_at),
            "codexRolloutSubdir": session.codex_rollout_subdir,
            "sessionPath": f"{session.tenant_id}/{session.project_id}/{session.session_id}",
            "readerId": self.reader_id,
            "readCursor": read_cursor,
            "attentionState": "active" if active else "unread" if unread else "read",
            "unread": unread,
            "active": active,
        }


class SessionListFiltersOut(serializers.Serializer):
    """The filters the page was listed with, as given (`cursor` as sent)."""

    state = serializers.ChoiceField(choices=list(STATES))
    backendProfile = serializers.CharField(allow_null=True, max_length=32)
    readerId = serializers.CharField(allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    cursor = serializers.CharField(allow_null=True, max_length=MAX_INTEGER_TEXT)
    limit = serializers.IntegerField(min_value=1)


class SessionListOut(serializers.Serializer):
    items = SessionOut(many=True)
    count = serializers.IntegerField(min_value=0)
    cursor = serializers.CharField(
        allow_null=True,
        max_length=CURSOR_MAX_LENGTH,
        help_text=(
            "With `cursor`: the last item's version, else the cursor given. Without: the highest version among "
            "the matching sessions (null when none match), to follow the change feed from."
        ),
    )
    nextPageToken = serializers.CharField(
        allow_null=True,
        max_length=PAGE_TOKEN_MAX_LENGTH,
        help_text="Pass it back as `pageToken`; null on the last page.",
    )
    filters = SessionListFiltersOut()
