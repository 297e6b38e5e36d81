"""Session bodies in, session summaries and read cursors out (camelCase, as the seed's records)."""

from __future__ import annotations

from rest_framework import serializers

from agentrun.fields import BIGINT_MAX, SESSION_ID_MAX_LENGTH, IdentifierField, JSONObjectField, StrictCharField, StrictIntegerField
from agentrun.wire import iso
from sessions.models import Session, StorageKind


class SessionPutIn(serializers.Serializer):
    sessionId = IdentifierField(required=False, max_length=SESSION_ID_MAX_LENGTH)
    tenantId = IdentifierField(required=False, allow_null=True, max_length=200)
    projectId = IdentifierField(required=False, allow_null=True, max_length=200)
    backendProfile = IdentifierField(max_length=32)
    conversationId = IdentifierField(required=False, allow_null=True, allow_blank=True, max_length=500)
    threadId = IdentifierField(required=False, allow_null=True, allow_blank=True, max_length=500)
    metadata = JSONObjectField(required=False, allow_null=True)
    expiresAt = StrictCharField(required=False, allow_null=True)
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
    sessionId = serializers.CharField()
    readerId = serializers.CharField()
    sessionVersion = serializers.IntegerField()
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

    sessionId = serializers.CharField()
    tenantId = serializers.CharField()
    projectId = serializers.CharField()
    backendProfile = serializers.CharField()
    conversationId = serializers.CharField(allow_null=True)
    threadId = serializers.CharField(allow_null=True)
    metadata = serializers.JSONField()
    version = serializers.IntegerField()
    executionState = serializers.CharField()
    lastRunId = serializers.CharField(allow_null=True)
    lastCommandId = serializers.CharField(allow_null=True)
    activeRunId = serializers.CharField(allow_null=True)
    activeCommandId = serializers.CharField(allow_null=True)
    lastEventSeq = serializers.IntegerField()
    terminalStatus = serializers.CharField(allow_null=True)
    failureKind = serializers.CharField(allow_null=True)
    title = serializers.CharField(allow_null=True)
    summary = serializers.JSONField()
    lastActivityAt = serializers.DateTimeField(allow_null=True)
    createdAt = serializers.DateTimeField()
    updatedAt = serializers.DateTimeField()
    expiresAt = serializers.DateTimeField(allow_null=True)
    storageKind = serializers.CharField()
    storagePvcName = serializers.CharField(allow_null=True)
    storageNamespace = serializers.CharField(allow_null=True)
    storagePvcPhase = serializers.CharField(allow_null=True)
    storageSizeBytes = serializers.IntegerField(allow_null=True)
    storageFilesCount = serializers.IntegerField(allow_null=True)
    storageSha256 = serializers.CharField(allow_null=True)
    storageUpdatedAt = serializers.DateTimeField(allow_null=True)
    storageEvictedAt = serializers.DateTimeField(allow_null=True)
    codexRolloutSubdir = serializers.CharField(allow_null=True)
    sessionPath = serializers.CharField()
    readerId = serializers.CharField(allow_null=True)
    readCursor = ReadCursorOut(allow_null=True)
    attentionState = serializers.ChoiceField(choices=["active", "unread", "read"])
    unread = serializers.BooleanField()
    active = serializers.BooleanField()

    def __init__(self, *args, reader_id: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reader_id = reader_id

    def to_representation(self, session: Session):
        version = getattr(session, "cursor_version", None)
        read_cursor = render_cursor(session.session_id, self.reader_id, version, getattr(session, "cursor_read_at", None))
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


class SessionListOut(serializers.Serializer):
    items = SessionOut(many=True)
    count = serializers.IntegerField()
    cursor = serializers.CharField(allow_null=True)
    nextPageToken = serializers.CharField(allow_null=True)
    filters = serializers.DictField()
