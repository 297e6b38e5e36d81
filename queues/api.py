"""The queue API: tasks (create, list, get, attempt, cancel, read), stats and the commander."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from agentrun.fields import BIGINT_MAX, validated
from agentrun.openapi import (
    PAGE_TOKEN_MAX_LENGTH,
    PageListSchema,
    error,
    page_token_parameter,
    query_cursor,
    query_integer,
    query_string,
)
from agentrun.wire import query_identifier, query_int
from queues import selectors, services
from queues.models import TaskState
from queues.serializers import (
    AttemptIn,
    CommanderOut,
    StatsOut,
    TaskCancelIn,
    TaskCreateIn,
    TaskListOut,
    TaskOut,
    TaskReadCursorOut,
    TaskReadIn,
)

CLIENT = "client"
MAX_LIMIT, DEFAULT_LIMIT = 100, 50
QUEUE = query_string("queue", description="Only this queue's tasks.")
TERMINAL_TASK = "The task is terminal: `cancelled` when it was cancelled, else `schema-invalid`."


def _task(task) -> dict:
    return TaskOut().to_representation(task)


class QueueTaskViewSet(viewsets.ViewSet):
    schema = PageListSchema()
    lookup_value_regex = "[^/]+"
    # Attempt updates are the operator's (who may do everything).
    roles = {
        "create": {CLIENT},
        "list": {CLIENT},
        "retrieve": {CLIENT},
        "cancel": {CLIENT},
        "read": {CLIENT},
        "attempt": set(),
    }

    @extend_schema(
        request=TaskCreateIn,
        responses={
            201: TaskOut,
            200: TaskOut,
            403: error("`tenant-policy-denied`: `tenantId`/`projectId` is outside the key's scope."),
            409: error("`schema-invalid`: the idempotency key was used before with another task."),
        },
    )
    def create(self, request):
        data = validated(TaskCreateIn, request.data)
        tenant_id, project_id = request.scope.fill(data.get("tenantId"), data.get("projectId"))
        task, created = services.task_create(
            tenant_id=tenant_id,
            project_id=project_id,
            queue=data["queue"],
            lane=data["lane"],
            title=data["title"],
            priority=data["priority"],
            backend_profile=data["backendProfile"],
            provider_id=data.get("providerId"),
            workspace_ref=data.get("workspaceRef"),
            session_ref=data.get("sessionRef"),
            execution_policy=data.get("executionPolicy"),
            resource_bundle_ref=data.get("resourceBundleRef"),
            payload=data.get("payload"),
            references=data.get("references"),
            metadata=data.get("metadata"),
            idempotency_key=data.get("idempotencyKey"),
        )
        return Response(_task(task), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(
        operation_id="queue_tasks_list",
        parameters=[
            QUEUE,
            query_string("state", enum=TaskState.values),
            query_cursor("cursor", "A version: the change feed, tasks changed after it, in version order."),
            query_cursor("updatedAfter", "Alias of `cursor` (a version, not a time)."),
            page_token_parameter("The previous page's `nextPageToken` (the priority view; not with `cursor`)."),
            query_integer(
                "limit", minimum=1, default=DEFAULT_LIMIT, description=f"Larger values are taken as {MAX_LIMIT}."
            ),
        ],
        responses=TaskListOut,
    )
    def list(self, request):
        params = request.query_params
        name = "cursor" if params.get("cursor") else "updatedAfter"
        cursor = query_int(params, name, default=None, minimum=0, at_most=BIGINT_MAX) if params.get(name) else None
        page = selectors.task_list(
            scope=request.scope,
            queue=query_identifier(params, "queue"),
            state=params.get("state") or None,
            cursor=cursor,
            page_token=query_identifier(params, "pageToken", max_length=PAGE_TOKEN_MAX_LENGTH),
            limit=query_int(params, "limit", default=DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT),
        )
        items = [_task(task) for task in page.tasks]
        return Response(
            {"items": items, "count": len(items), "cursor": page.cursor, "nextPageToken": page.next_page_token}
        )

    @extend_schema(responses=TaskOut)
    def retrieve(self, request, pk=None):
        return Response(_task(selectors.task_get(task_id=pk, scope=request.scope)))

    @extend_schema(
        request=AttemptIn,
        responses={
            200: TaskOut,
            409: error(TERMINAL_TASK),
        },
    )
    @action(detail=True, methods=["post"])
    def attempt(self, request, pk=None):
        data = validated(AttemptIn, request.data)
        task = services.task_attempt_update(
            task_id=pk,
            state=data["state"],
            latest_attempt=data["latestAttempt"],
            session_path=data.get("sessionPath"),
            scope=request.scope,
        )
        return Response(_task(task))

    @extend_schema(request=TaskCancelIn, responses=TaskOut)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        data = validated(TaskCancelIn, request.data)
        return Response(_task(services.task_cancel(task_id=pk, reason=data.get("reason"), scope=request.scope)))

    @extend_schema(request=TaskReadIn, responses=TaskReadCursorOut)
    @action(detail=True, methods=["post"])
    def read(self, request, pk=None):
        data = validated(TaskReadIn, request.data)
        cursor = services.task_mark_read(task_id=pk, reader_id=data["readerId"], scope=request.scope)
        return Response(TaskReadCursorOut().to_representation(cursor))


class QueueViewSet(viewsets.ViewSet):
    roles = {"stats": {CLIENT}, "commander": {CLIENT}}

    @extend_schema(parameters=[QUEUE], responses=StatsOut)
    @action(detail=False, methods=["get"])
    def stats(self, request):
        stats = selectors.task_stats(scope=request.scope, queue=query_identifier(request.query_params, "queue"))
        return Response(StatsOut().to_representation(stats))

    @extend_schema(
        parameters=[QUEUE, query_string("readerId", description="Whose read cursors decide `unread`.")],
        responses=CommanderOut,
    )
    @action(detail=False, methods=["get"])
    def commander(self, request):
        reader_id = query_identifier(request.query_params, "readerId")
        snapshot = selectors.commander(
            scope=request.scope, queue=query_identifier(request.query_params, "queue"), reader_id=reader_id
        )
        return Response(CommanderOut().to_representation(snapshot))
