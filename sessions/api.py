"""The sessions API: the inbox and change feed, one session, PUT, read, storage."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from agentrun.auth import Role
from agentrun.backends import require_profile
from agentrun.errors import invalid
from agentrun.fields import SESSION_ID_MAX_LENGTH, check_identifier, validated
from agentrun.openapi import PageListSchema, error
from agentrun.wire import page, parse_iso
from sessions import selectors, services
from sessions.serializers import (
    EvictIn,
    ReadCursorOut,
    ReadIn,
    SessionListOut,
    SessionListQuery,
    SessionOut,
    SessionPutIn,
    SessionQuery,
    StorageIn,
)


class SessionViewSet(viewsets.ViewSet):
    schema = PageListSchema()
    lookup_value_regex = "[^/]+"
    roles = {
        "list": {Role.CLIENT},
        "retrieve": {Role.CLIENT},
        "update": {Role.CLIENT},
        "read": {Role.CLIENT},
        "storage": {Role.RUNNER},
        "storage_evict": {Role.RUNNER},
    }

    @extend_schema(operation_id="sessions_list", parameters=[SessionListQuery], responses=SessionListOut)
    def list(self, request):
        query = validated(SessionListQuery, request.query_params)
        found = selectors.session_list(
            scope=request.scope,
            state=query["state"],
            backend_profile=query["backend_profile"],
            reader_id=query["reader_id"],
            cursor=query["cursor"],
            page_token=query["page_token"],
            limit=query["limit"],
        )
        record = page(found.sessions, cursor=found.cursor, nextPageToken=found.next_page_token, filters=query)
        return Response(SessionListOut(context={"reader_id": query["reader_id"]}).to_representation(record))

    @extend_schema(parameters=[SessionQuery], responses=SessionOut)
    def retrieve(self, request, pk=None):
        reader_id = validated(SessionQuery, request.query_params)["reader_id"]
        session = selectors.session_with_cursor(session_id=pk, reader_id=reader_id, scope=request.scope)
        return Response(SessionOut(reader_id=reader_id).to_representation(session))

    @extend_schema(
        request=SessionPutIn,
        responses={
            201: SessionOut,
            200: SessionOut,
            403: error(
                "`tenant-policy-denied`: the session belongs to another tenant or project, or the body names one."
            ),
        },
    )
    def update(self, request, pk=None):
        check_identifier(pk, field="sessionId", max_length=SESSION_ID_MAX_LENGTH)
        data = validated(SessionPutIn, request.data)
        if data.pop("session_id", None) not in (None, pk):
            raise invalid("sessionId in the body must match the path", field="sessionId")
        tenant_id, project_id = request.scope.fill(data.pop("tenant_id", None), data.pop("project_id", None))
        data["backend_profile"] = require_profile(data["backend_profile"])
        data["expires_at"] = parse_iso(data.get("expires_at"), field="expiresAt")
        session, created = services.session_upsert(session_id=pk, tenant_id=tenant_id, project_id=project_id, **data)
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(SessionOut().to_representation(session), status=code)

    @extend_schema(request=ReadIn, responses=ReadCursorOut)
    @action(detail=True, methods=["post"])
    def read(self, request, pk=None):
        data = validated(ReadIn, request.data)
        cursor = services.session_mark_read(session_id=pk, **data, scope=request.scope)
        return Response(ReadCursorOut().to_representation(cursor))

    @extend_schema(request=StorageIn, responses=SessionOut)
    @action(detail=True, methods=["post"])
    def storage(self, request, pk=None):
        data = validated(StorageIn, request.data)
        session = services.session_storage_refresh(session_id=pk, **data, scope=request.scope)
        return Response(SessionOut().to_representation(session))

    @extend_schema(
        request=EvictIn,
        responses={
            200: SessionOut,
            409: error("`schema-invalid`: `pvcName` is not the session's current PVC; nothing changed."),
        },
    )
    @action(detail=True, methods=["post"], url_path="storage/evict")
    def storage_evict(self, request, pk=None):
        data = validated(EvictIn, request.data)
        session = services.session_storage_evict(session_id=pk, **data, scope=request.scope)
        return Response(SessionOut().to_representation(session))
