"""Queue task bodies and queries in; tasks, summaries, read cursors, stats and the commander out."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from agentrun import webhooks
from agentrun.fields import IDENTIFIER_MAX_LENGTH, IdentifierField, JSONObjectField, StrictCharField, StrictIntegerField
from agentrun.openapi import (
    CURSOR_MAX_LENGTH,
    PAGE_TOKEN_MAX_LENGTH,
    BackendProfileField,
    ReaderAttention,
    documented_enum,
)
from agentrun.wire import (
    QueryCursor,
    QueryIdentifier,
    QueryInteger,
    QueryText,
    RecordSerializer,
    TimestampField,
    iso_text,
)
from queues.models import TASK_ACTIVE, QueueTask, TaskState
from runs.serializers import validate_execution_policy, validate_webhook_url, webhook_url_field

MAX_TITLE = 500
MAX_REASON = 2000
MAX_SESSION_PATH = 4000


class TaskCreateIn(serializers.Serializer):
    tenantId = IdentifierField(source="tenant_id", required=False, allow_null=True, max_length=200)
    projectId = IdentifierField(source="project_id", required=False, allow_null=True, max_length=200)
    queue = IdentifierField(max_length=200)
    lane = IdentifierField(required=False, default="default", max_length=200)
    title = StrictCharField(required=False, default="", allow_blank=True, max_length=MAX_TITLE)
    priority = StrictIntegerField(required=False, default=0, min_value=-1_000_000, max_value=1_000_000)
    backendProfile = BackendProfileField(source="backend_profile", max_length=32)
    providerId = IdentifierField(source="provider_id", required=False, allow_null=True, max_length=200)
    workspaceRef = serializers.JSONField(source="workspace_ref", required=False, allow_null=True)
    sessionRef = JSONObjectField(source="session_ref", required=False, allow_null=True)
    executionPolicy = JSONObjectField(source="execution_policy", required=False, allow_null=True)
    resourceBundleRef = JSONObjectField(source="resource_bundle_ref", required=False, allow_null=True)
    payload = JSONObjectField(required=False, allow_null=True)
    references = serializers.JSONField(required=False, allow_null=True)
    metadata = JSONObjectField(required=False, allow_null=True)
    idempotencyKey = IdentifierField(
        source="idempotency_key", required=False, allow_null=True, allow_blank=True, max_length=200
    )
    webhookUrl = webhook_url_field("task")

    def validate_executionPolicy(self, value):
        return validate_execution_policy(value)

    def validate_webhookUrl(self, value):
        return validate_webhook_url(value)


class AttemptIn(serializers.Serializer):
    state = serializers.ChoiceField(choices=TaskState.values)
    latestAttempt = JSONObjectField(source="latest_attempt", allow_null=True)
    sessionPath = StrictCharField(
        source="session_path", required=False, allow_null=True, default=None, max_length=MAX_SESSION_PATH
    )


class TaskReadIn(serializers.Serializer):
    readerId = IdentifierField(source="reader_id", max_length=200)


class TaskCancelIn(serializers.Serializer):
    reason = StrictCharField(required=False, allow_null=True, allow_blank=True, max_length=MAX_REASON)


class AttemptRefField(serializers.JSONField):
    """A task's latest attempt: the JSON the dispatcher (or an operator) wrote, its `startedAt`
    written as every timestamp on the wire is (`iso_text`)."""

    def to_representation(self, value):
        if isinstance(value, dict) and isinstance(value.get("startedAt"), str):
            return {**value, "startedAt": iso_text(value["startedAt"])}
        return value


class TaskOut(RecordSerializer):
    id = serializers.CharField(max_length=64)
    tenantId = serializers.CharField(source="tenant_id", max_length=IDENTIFIER_MAX_LENGTH)
    projectId = serializers.CharField(source="project_id", max_length=IDENTIFIER_MAX_LENGTH)
    queue = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    lane = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    title = serializers.CharField(max_length=MAX_TITLE, allow_blank=True)
    priority = serializers.IntegerField()
    backendProfile = serializers.CharField(source="backend_profile", max_length=32)
    providerId = serializers.CharField(source="provider_id", allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    workspaceRef = serializers.JSONField(source="workspace_ref", allow_null=True)
    sessionRef = serializers.JSONField(source="session_ref", allow_null=True)
    executionPolicy = serializers.JSONField(source="execution_policy", allow_null=True)
    resourceBundleRef = serializers.JSONField(source="resource_bundle_ref", allow_null=True)
    payload = serializers.JSONField(allow_null=True)
    references = serializers.JSONField(allow_null=True)
    metadata = serializers.JSONField(allow_null=True)
    idempotencyKey = serializers.CharField(source="idempotency_key", allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    webhookUrl = serializers.CharField(source="webhook_url", allow_null=True, max_length=webhooks.MAX_URL_LENGTH)
    state = serializers.ChoiceField(choices=TaskState.values)
    version = serializers.IntegerField(min_value=0)
    payloadHash = serializers.CharField(source="payload_hash", max_length=64)
    latestAttempt = AttemptRefField(source="latest_attempt", allow_null=True)
    sessionPath = serializers.CharField(source="session_path", allow_null=True, max_length=MAX_SESSION_PATH)
    createdAt = TimestampField(source="created_at")
    updatedAt = TimestampField(source="updated_at")
    cancelledAt = TimestampField(source="cancelled_at", allow_null=True)
    cancelReason = serializers.CharField(source="cancel_reason", allow_null=True, max_length=MAX_REASON)


class TaskReadCursorOut(RecordSerializer):
    taskId = serializers.CharField(source="task_id", max_length=64)
    readerId = serializers.CharField(source="reader_id", max_length=IDENTIFIER_MAX_LENGTH)
    taskVersion = serializers.IntegerField(source="task_version", min_value=0)
    readAt = TimestampField(source="read_at")


# The attention is the context's reader's (`reader_id`).
class TaskSummaryOut(ReaderAttention, TaskOut):
    """A task with its attention for one reader (SPEC §1.7 QueueTaskSummary)."""

    readerId = serializers.SerializerMethodField()
    readCursor = serializers.SerializerMethodField()
    attentionState = serializers.SerializerMethodField()
    unread = serializers.SerializerMethodField()
    active = serializers.SerializerMethodField()

    @extend_schema_field(TaskReadCursorOut(allow_null=True))
    def get_readCursor(self, task: QueueTask) -> dict | None:
        return self._read_cursor(task, _READ_CURSOR, record_id=("task_id", task.id), version_source="task_version")

    @extend_schema_field(serializers.BooleanField())
    def get_active(self, task: QueueTask) -> bool:
        return task.state in TASK_ACTIVE


# One instance renders every row's cursor: a serializer per row would copy its fields each time.
_READ_CURSOR = TaskReadCursorOut()


class StatsOut(RecordSerializer):
    queue = serializers.CharField(allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    total = serializers.IntegerField(min_value=0)
    byState = serializers.DictField(child=serializers.IntegerField(min_value=0), help_text="Tasks by state.")
    byLane = serializers.DictField(child=serializers.IntegerField(min_value=0), help_text="Tasks by lane.")
    maxVersion = serializers.IntegerField(min_value=0)
    generatedAt = TimestampField()


# Its items' attention is the context's reader's (`reader_id`, the snapshot's `readerId`).
class CommanderOut(RecordSerializer):
    queue = serializers.CharField(allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    readerId = serializers.CharField(allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    stats = StatsOut()
    items = TaskSummaryOut(many=True)
    generatedAt = TimestampField()


class TaskListOut(RecordSerializer):
    items = TaskOut(many=True)
    count = serializers.IntegerField(min_value=0)
    cursor = serializers.CharField(
        allow_null=True,
        max_length=CURSOR_MAX_LENGTH,
        help_text=(
            "With `cursor`: the last item's version, else the cursor given. Without: the highest version among the "
            "matching tasks (null when none match)."
        ),
    )
    nextPageToken = serializers.CharField(
        allow_null=True,
        max_length=PAGE_TOKEN_MAX_LENGTH,
        help_text=("Pass it back as `pageToken`; null on the last page."),
    )


# --- queries --------------------------------------------------------------------------------

MAX_LIMIT, DEFAULT_LIMIT = 100, 50
# Checked by the selector, so its 400 stays the selector's.
TaskStateParameter = documented_enum(QueryText, TaskState.values, keep_order=True)


def _queue() -> QueryIdentifier:
    return QueryIdentifier(help_text="Only this queue's tasks.")


class TaskListQuery(serializers.Serializer):
    """The priority view (paged by `pageToken`) or, with `cursor`, the change feed. Parameters
    are checked in this order; `cursor` with `pageToken`, and `state`, by the selector."""

    cursor = QueryCursor(help_text="A version: the change feed, tasks changed after it, in version order.")
    updatedAfter = QueryCursor(
        source="updated_after", alias_of="cursor", help_text="Alias of `cursor` (a version, not a time)."
    )
    queue = _queue()
    state = TaskStateParameter()
    pageToken = QueryIdentifier(
        source="page_token",
        max_length=PAGE_TOKEN_MAX_LENGTH,
        help_text="The previous page's `nextPageToken` (the priority view; not with `cursor`).",
    )
    limit = QueryInteger(
        minimum=1, clamp=MAX_LIMIT, default=DEFAULT_LIMIT, help_text=f"Larger values are taken as {MAX_LIMIT}."
    )

    def validate(self, attrs: dict) -> dict:
        updated_after = attrs.pop("updated_after")
        if attrs["cursor"] is None:
            attrs["cursor"] = updated_after
        return attrs


class StatsQuery(serializers.Serializer):
    queue = _queue()


class CommanderQuery(serializers.Serializer):
    readerId = QueryIdentifier(source="reader_id", help_text="Whose read cursors decide `unread`.")
    queue = _queue()
