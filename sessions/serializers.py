"""Session bodies and queries in, session summaries and read cursors out (camelCase, as the seed's records)."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from agentrun.backends import require_profile
from agentrun.fields import (
    BIGINT_MAX,
    IDENTIFIER_MAX_LENGTH,
    SESSION_ID_MAX_LENGTH,
    IdentifierField,
    JSONObjectField,
    StrictCharField,
    StrictIntegerField,
)
from agentrun.openapi import (
    CURSOR_MAX_LENGTH,
    PAGE_TOKEN_MAX_LENGTH,
    BackendProfileField,
    BackendProfileParameter,
    ReaderAttention,
    documented_enum,
)
from agentrun.wire import (
    MAX_INTEGER_TEXT,
    QueryCursor,
    QueryIdentifier,
    QueryInteger,
    QueryText,
    RecordSerializer,
    TimestampField,
)
from sessions.models import ExecutionState, Session, StorageKind
from sessions.selectors import STATES

# `tenantId/projectId/sessionId`.
SESSION_PATH_MAX_LENGTH = 2 * IDENTIFIER_MAX_LENGTH + SESSION_ID_MAX_LENGTH + 2


class SessionPutIn(serializers.Serializer):
    sessionId = IdentifierField(source="session_id", required=False, max_length=SESSION_ID_MAX_LENGTH)
    tenantId = IdentifierField(source="tenant_id", required=False, allow_null=True, max_length=200)
    projectId = IdentifierField(source="project_id", required=False, allow_null=True, max_length=200)
    backendProfile = BackendProfileField(source="backend_profile", max_length=32)
    conversationId = IdentifierField(
        source="conversation_id", required=False, allow_null=True, allow_blank=True, max_length=500
    )
    threadId = IdentifierField(source="thread_id", required=False, allow_null=True, allow_blank=True, max_length=500)
    metadata = JSONObjectField(required=False, allow_null=True)
    expiresAt = StrictCharField(
        source="expires_at", required=False, allow_null=True, max_length=64, help_text="ISO-8601."
    )
    codexRolloutSubdir = StrictCharField(
        source="codex_rollout_subdir", required=False, allow_null=True, allow_blank=True, max_length=500
    )


class ReadIn(serializers.Serializer):
    readerId = IdentifierField(source="reader_id", max_length=200)


class StorageIn(serializers.Serializer):
    storageKind = serializers.ChoiceField(source="storage_kind", choices=StorageKind.values)
    pvcName = IdentifierField(source="pvc_name", required=False, allow_null=True, max_length=253)
    storageNamespace = IdentifierField(source="namespace", required=False, allow_null=True, max_length=253)
    pvcPhase = StrictCharField(source="pvc_phase", required=False, allow_null=True, max_length=64)
    storageSizeBytes = StrictIntegerField(
        source="size_bytes", required=False, allow_null=True, min_value=0, max_value=BIGINT_MAX
    )
    storageFilesCount = StrictIntegerField(
        source="files_count", required=False, allow_null=True, min_value=0, max_value=BIGINT_MAX
    )
    storageSha256 = StrictCharField(source="sha256", required=False, allow_null=True, max_length=64)
    codexRolloutSubdir = StrictCharField(
        source="codex_rollout_subdir", required=False, allow_null=True, allow_blank=True, max_length=500
    )


class EvictIn(serializers.Serializer):
    pvcName = IdentifierField(source="pvc_name", max_length=253)


class ReadCursorOut(RecordSerializer):
    sessionId = serializers.CharField(source="session_id", max_length=SESSION_ID_MAX_LENGTH)
    readerId = serializers.CharField(source="reader_id", max_length=IDENTIFIER_MAX_LENGTH)
    sessionVersion = serializers.IntegerField(source="session_version", min_value=0)
    readAt = TimestampField(source="read_at")


# The attention is the context's reader's (`reader_id`, or the `reader_id=` argument): a
# listing's `cursor_version` and `cursor_read_at` are that reader's cursor.
class SessionOut(ReaderAttention, RecordSerializer):
    """The session record plus its attention (SPEC §1.5 SessionSummary, §4.7 with A13)."""

    sessionId = serializers.CharField(source="session_id", max_length=SESSION_ID_MAX_LENGTH)
    tenantId = serializers.CharField(source="tenant_id", max_length=IDENTIFIER_MAX_LENGTH)
    projectId = serializers.CharField(source="project_id", max_length=IDENTIFIER_MAX_LENGTH)
    backendProfile = serializers.CharField(source="backend_profile", max_length=32)
    conversationId = serializers.CharField(source="conversation_id", allow_null=True, max_length=500)
    threadId = serializers.CharField(source="thread_id", allow_null=True, max_length=500)
    metadata = serializers.JSONField()
    version = serializers.IntegerField(min_value=0)
    executionState = serializers.ChoiceField(source="execution_state", choices=ExecutionState.values)
    lastRunId = serializers.CharField(source="last_run_id", allow_null=True, max_length=64)
    lastCommandId = serializers.CharField(source="last_command_id", allow_null=True, max_length=64)
    activeRunId = serializers.CharField(source="active_run_id", allow_null=True, max_length=64)
    activeCommandId = serializers.CharField(source="active_command_id", allow_null=True, max_length=64)
    lastEventSeq = serializers.IntegerField(source="last_event_seq", min_value=0)
    terminalStatus = serializers.CharField(source="terminal_status", allow_null=True, max_length=32)
    failureKind = serializers.CharField(source="failure_kind", allow_null=True, max_length=64)
    title = serializers.CharField(allow_null=True, max_length=200)
    summary = serializers.JSONField()
    lastActivityAt = TimestampField(source="last_activity_at", allow_null=True)
    createdAt = TimestampField(source="created_at")
    updatedAt = TimestampField(source="updated_at")
    expiresAt = TimestampField(source="expires_at", allow_null=True)
    storageKind = serializers.ChoiceField(source="storage_kind", choices=StorageKind.values)
    storagePvcName = serializers.CharField(source="storage_pvc_name", allow_null=True, max_length=253)
    storageNamespace = serializers.CharField(source="storage_namespace", allow_null=True, max_length=253)
    storagePvcPhase = serializers.CharField(source="storage_pvc_phase", allow_null=True, max_length=64)
    storageSizeBytes = serializers.IntegerField(source="storage_size_bytes", allow_null=True, min_value=0)
    storageFilesCount = serializers.IntegerField(source="storage_files_count", allow_null=True, min_value=0)
    storageSha256 = serializers.CharField(source="storage_sha256", allow_null=True, max_length=64)
    storageUpdatedAt = TimestampField(source="storage_updated_at", allow_null=True)
    storageEvictedAt = TimestampField(source="storage_evicted_at", allow_null=True)
    codexRolloutSubdir = serializers.CharField(source="codex_rollout_subdir", allow_null=True, max_length=500)
    sessionPath = serializers.SerializerMethodField(help_text="`tenantId/projectId/sessionId`.")
    readerId = serializers.SerializerMethodField()
    readCursor = serializers.SerializerMethodField()
    attentionState = serializers.SerializerMethodField()
    unread = serializers.SerializerMethodField()
    active = serializers.SerializerMethodField()

    def __init__(self, *args, reader_id: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if reader_id is not None:
            self._context = {**self._context, "reader_id": reader_id}

    @extend_schema_field({"type": "string", "maxLength": SESSION_PATH_MAX_LENGTH})
    def get_sessionPath(self, session: Session) -> str:
        return f"{session.tenant_id}/{session.project_id}/{session.session_id}"

    @extend_schema_field(ReadCursorOut(allow_null=True))
    def get_readCursor(self, session: Session) -> dict | None:
        return self._read_cursor(
            session, _READ_CURSOR, record_id=("session_id", session.session_id), version_source="session_version"
        )

    @extend_schema_field(serializers.BooleanField())
    def get_active(self, session: Session) -> bool:
        return session.active


# One instance renders every row's cursor: a serializer per row would copy its fields each time.
_READ_CURSOR = ReadCursorOut()


class SessionListFiltersOut(RecordSerializer):
    """The filters the page was listed with, as given (`cursor` as sent)."""

    state = serializers.ChoiceField(choices=list(STATES))
    backendProfile = serializers.CharField(source="backend_profile", allow_null=True, max_length=32)
    readerId = serializers.CharField(source="reader_id", allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    cursor = serializers.CharField(source="cursor_text", allow_null=True, max_length=MAX_INTEGER_TEXT)
    limit = serializers.IntegerField(min_value=1)


class SessionListOut(RecordSerializer):
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


# --- queries --------------------------------------------------------------------------------

MAX_LIMIT, DEFAULT_LIMIT = 100, 50
# Checked by the selector (`state`) and by `require_profile`, so their 400s stay theirs.
SessionStateParameter = documented_enum(QueryText, STATES, keep_order=True)


def _reader() -> QueryIdentifier:
    return QueryIdentifier(source="reader_id", help_text="Whose read cursors decide `unread` and `readCursor`.")


class SessionQuery(serializers.Serializer):
    readerId = _reader()


class SessionListQuery(serializers.Serializer):
    """The inbox (sorted, paged by `pageToken`) or, with `cursor`, the change feed. Parameters
    are checked in this order; `state`, and `cursor` with `pageToken`, by the selector."""

    state = SessionStateParameter(
        default="default", help_text="Attention filter (default: `default`, active or unread)."
    )
    backendProfile = BackendProfileParameter(source="backend_profile")
    readerId = _reader()
    cursor = QueryCursor(help_text="A version: the change feed, sessions changed after it, in version order.")
    updatedAfter = QueryCursor(source="updated_after", alias_of="cursor", help_text="Alias of `cursor`.")
    limit = QueryInteger(
        minimum=1, clamp=MAX_LIMIT, default=DEFAULT_LIMIT, help_text=f"Larger values are taken as {MAX_LIMIT}."
    )
    pageToken = QueryIdentifier(
        source="page_token",
        max_length=PAGE_TOKEN_MAX_LENGTH,
        help_text="The previous page's `nextPageToken` (the sorted inbox; not with `cursor`).",
    )

    def validate_backendProfile(self, value: str | None) -> str | None:
        return require_profile(value) if value is not None else None

    def validate(self, attrs: dict) -> dict:
        updated_after = attrs.pop("updated_after")
        if attrs["cursor"] is None:
            attrs["cursor"] = updated_after
        # The cursor as sent, for the page's `filters`.
        attrs["cursor_text"] = self.initial_data.get("cursor") or self.initial_data.get("updatedAfter") or None
        return attrs
