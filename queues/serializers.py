"""Queue task bodies in; tasks, summaries, read cursors, stats and the commander out."""

from __future__ import annotations

from rest_framework import serializers

from agentrun.fields import IDENTIFIER_MAX_LENGTH, IdentifierField, JSONObjectField, StrictCharField, StrictIntegerField
from agentrun.openapi import CURSOR_MAX_LENGTH, PAGE_TOKEN_MAX_LENGTH, BackendProfileField
from agentrun.wire import iso
from queues.models import TASK_ACTIVE, TaskState
from runs.serializers import validate_execution_policy

MAX_TITLE = 500
MAX_REASON = 2000
MAX_SESSION_PATH = 4000


class TaskCreateIn(serializers.Serializer):
    tenantId = IdentifierField(required=False, allow_null=True, max_length=200)
    projectId = IdentifierField(required=False, allow_null=True, max_length=200)
    queue = IdentifierField(max_length=200)
    lane = IdentifierField(required=False, default="default", max_length=200)
    title = StrictCharField(required=False, default="", allow_blank=True, max_length=MAX_TITLE)
    priority = StrictIntegerField(required=False, default=0, min_value=-1_000_000, max_value=1_000_000)
    backendProfile = BackendProfileField(max_length=32)
    providerId = IdentifierField(required=False, allow_null=True, max_length=200)
    workspaceRef = serializers.JSONField(required=False, allow_null=True)
    sessionRef = JSONObjectField(required=False, allow_null=True)
    executionPolicy = JSONObjectField(required=False, allow_null=True)
    resourceBundleRef = JSONObjectField(required=False, allow_null=True)
    payload = JSONObjectField(required=False, allow_null=True)
    references = serializers.JSONField(required=False, allow_null=True)
    metadata = JSONObjectField(required=False, allow_null=True)
    idempotencyKey = IdentifierField(required=False, allow_null=True, allow_blank=True, max_length=200)

    def validate_executionPolicy(self, value):
        return validate_execution_policy(value)


class AttemptIn(serializers.Serializer):
    state = serializers.ChoiceField(choices=TaskState.values)
    latestAttempt = JSONObjectField(allow_null=True)
    sessionPath = StrictCharField(required=False, allow_null=True, max_length=MAX_SESSION_PATH)


class TaskReadIn(serializers.Serializer):
    readerId = IdentifierField(max_length=200)


class TaskCancelIn(serializers.Serializer):
    reason = StrictCharField(required=False, allow_null=True, allow_blank=True, max_length=MAX_REASON)


class TaskOut(serializers.Serializer):
    id = serializers.CharField(max_length=64)
    tenantId = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    projectId = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    queue = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    lane = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    title = serializers.CharField(max_length=MAX_TITLE, allow_blank=True)
    priority = serializers.IntegerField()
    backendProfile = serializers.CharField(max_length=32)
    providerId = serializers.CharField(allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    workspaceRef = serializers.JSONField(allow_null=True)
    sessionRef = serializers.JSONField(allow_null=True)
    executionPolicy = serializers.JSONField(allow_null=True)
    resourceBundleRef = serializers.JSONField(allow_null=True)
    payload = serializers.JSONField(allow_null=True)
    references = serializers.JSONField(allow_null=True)
    metadata = serializers.JSONField(allow_null=True)
    idempotencyKey = serializers.CharField(allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    state = serializers.ChoiceField(choices=TaskState.values)
    version = serializers.IntegerField(min_value=0)
    payloadHash = serializers.CharField(max_length=64)
    latestAttempt = serializers.JSONField(allow_null=True)
    sessionPath = serializers.CharField(allow_null=True, max_length=MAX_SESSION_PATH)
    createdAt = serializers.DateTimeField()
    updatedAt = serializers.DateTimeField()
    cancelledAt = serializers.DateTimeField(allow_null=True)
    cancelReason = serializers.CharField(allow_null=True, max_length=MAX_REASON)

    def to_representation(self, task):
        return {
            "id": task.id,
            "tenantId": task.tenant_id,
            "projectId": task.project_id,
            "queue": task.queue,
            "lane": task.lane,
            "title": task.title,
            "priority": task.priority,
            "backendProfile": task.backend_profile,
            "providerId": task.provider_id,
            "workspaceRef": task.workspace_ref,
            "sessionRef": task.session_ref,
            "executionPolicy": task.execution_policy,
            "resourceBundleRef": task.resource_bundle_ref,
            "payload": task.payload,
            "references": task.references,
            "metadata": task.metadata,
            "idempotencyKey": task.idempotency_key,
            "state": task.state,
            "version": task.version,
            "payloadHash": task.payload_hash,
            "latestAttempt": task.latest_attempt,
            "sessionPath": task.session_path,
            "createdAt": iso(task.created_at),
            "updatedAt": iso(task.updated_at),
            "cancelledAt": iso(task.cancelled_at),
            "cancelReason": task.cancel_reason,
        }


class TaskReadCursorOut(serializers.Serializer):
    taskId = serializers.CharField(max_length=64)
    readerId = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    taskVersion = serializers.IntegerField(min_value=0)
    readAt = serializers.DateTimeField()

    def to_representation(self, cursor):
        return {
            "taskId": cursor.task_id,
            "readerId": cursor.reader_id,
            "taskVersion": cursor.task_version,
            "readAt": iso(cursor.read_at),
        }


class TaskSummaryOut(TaskOut):
    """A task with its attention for one reader (SPEC §1.7 QueueTaskSummary)."""

    readerId = serializers.CharField(allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    readCursor = TaskReadCursorOut(allow_null=True)
    active = serializers.BooleanField()
    unread = serializers.BooleanField()
    attentionState = serializers.ChoiceField(choices=["active", "unread", "read"])

    def __init__(self, *args, reader_id: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reader_id = reader_id

    def to_representation(self, task):
        record = super().to_representation(task)
        version = getattr(task, "cursor_version", None)
        cursor = None
        if self.reader_id is not None and version is not None:
            cursor = {
                "taskId": task.id,
                "readerId": self.reader_id,
                "taskVersion": version,
                "readAt": iso(task.cursor_read_at),
            }
        active = task.state in TASK_ACTIVE
        unread = not active and (cursor is None or version < task.version)
        record.update(
            readerId=self.reader_id,
            readCursor=cursor,
            attentionState=("active" if active else "unread" if unread else "read"),
            unread=unread,
            active=active,
        )
        return record


class StatsOut(serializers.Serializer):
    queue = serializers.CharField(allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    total = serializers.IntegerField(min_value=0)
    byState = serializers.DictField(child=serializers.IntegerField(min_value=0), help_text="Tasks by state.")
    byLane = serializers.DictField(child=serializers.IntegerField(min_value=0), help_text="Tasks by lane.")
    maxVersion = serializers.IntegerField(min_value=0)
    generatedAt = serializers.DateTimeField()

    def to_representation(self, stats):
        return {**stats, "generatedAt": iso(stats["generatedAt"])}


class CommanderOut(serializers.Serializer):
    queue = serializers.CharField(allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    readerId = serializers.CharField(allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    stats = StatsOut()
    items = TaskSummaryOut(many=True)
    generatedAt = serializers.DateTimeField()

    def to_representation(self, snapshot):
        summary = TaskSummaryOut(reader_id=snapshot["readerId"])
        return {
            "queue": snapshot["queue"],
            "readerId": snapshot["readerId"],
            "stats": StatsOut().to_representation(snapshot["stats"]),
            "items": [summary.to_representation(task) for task in snapshot["items"]],
            "generatedAt": iso(snapshot["generatedAt"]),
        }


class TaskListOut(serializers.Serializer):
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
