"""The queue API: tasks (create, list, get, attempt, cancel, read), stats and the commander."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from agentrun.auth import Role
from agentrun.fields import validated
from agentrun.openapi import PageListSchema, error
from agentrun.wire import page
from queues import selectors, services
from queues.serializers import (
    AttemptIn,
    CommanderOut,
    CommanderQuery,
    StatsOut,
    StatsQuery,
    TaskCancelIn,
    TaskCreateIn,
    TaskListOut,
    TaskListQuery,
    TaskOut,
    TaskReadCursorOut,
    TaskReadIn,
)

TERMINAL_TASK = "The task is terminal: `cancelled` when it was cancelled, else `schema-invalid`."


def _task(task) -> dict:
    return TaskOut().to_representation(task)


class QueueTaskViewSet(viewsets.ViewSet):
    schema = PageListSchema()
    lookup_value_regex = "[^/]+"
    # Attempt updates are the operator's (who may do everything).
    roles = {
        "create": {Role.CLIENT},
        "list": {Role.CLIENT},
        "retrieve": {Role.CLIENT},
        "cancel": {Role.CLIENT},
        "read": {Role.CLIENT},
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
        tenant_id, project_id = request.scope.fill(data.pop("tenant_id", None), data.pop("project_id", None))
        task, created = services.task_create(tenant_id=tenant_id, project_id=project_id, **data)
        return Response(_task(task), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(operation_id="queue_tasks_list", parameters=[TaskListQuery], responses=TaskListOut)
    def list(self, request):
        query = validated(TaskListQuery, request.query_params)
        found = selectors.task_list(scope=request.scope, **query)
        record = page(found.tasks, cursor=found.cursor, nextPageToken=found.next_page_token)
        return Response(TaskListOut().to_representation(record))

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
        return Response(_task(services.task_attempt_update(task_id=pk, **data, scope=request.scope)))

    @extend_schema(request=TaskCancelIn, responses=TaskOut)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        data = validated(TaskCancelIn, request.data)
        return Response(_task(services.task_cancel(task_id=pk, **data, scope=request.scope)))

    @extend_schema(request=TaskReadIn, responses=TaskReadCursorOut)
    @action(detail=True, methods=["post"])
    def read(self, request, pk=None):
        data = validated(TaskReadIn, request.data)
        cursor = services.task_mark_read(task_id=pk, **data, scope=request.scope)
        return Response(TaskReadCursorOut().to_representation(cursor))


class QueueViewSet(viewsets.ViewSet):
    roles = {"stats": {Role.CLIENT}, "commander": {Role.CLIENT}}

    @extend_schema(parameters=[StatsQuery], responses=StatsOut)
    @action(detail=False, methods=["get"])
    def stats(self, request):
        query = validated(StatsQuery, request.query_params)
        return Response(StatsOut().to_representation(selectors.task_stats(scope=request.scope, **query)))

    @extend_schema(parameters=[CommanderQuery], responses=CommanderOut)
    @action(detail=False, methods=["get"])
    def commander(self, request):
        query = validated(CommanderQuery, request.query_params)
        snapshot = selectors.commander(scope=request.scope, **query)
        return Response(CommanderOut(context={"reader_id": query["reader_id"]}).to_representation(snapshot))
