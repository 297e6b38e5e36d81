"""The sessions API: the inbox and change feed, one session, PUT, read, storage."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from agentrun.backends import PROFILES, require_profile
from agentrun.errors import invalid
from agentrun.fields import BIGINT_MAX, SESSION_ID_MAX_LENGTH, check_identifier, validated
from agentrun.openapi import (
    PAGE_TOKEN_MAX_LENGTH,
    PageListSchema,
    error,
    page_token_parameter,
    query_cursor,
    query_integer,
    query_string,
)
from agentrun.wire import parse_iso, query_identifier, query_int
from sessions import selectors, services
from sessions.serializers import EvictIn, ReadCursorOut, ReadIn, SessionListOut, SessionOut, SessionPutIn, StorageIn

CLIENT, RUNNER = "client", "runner"
MAX_LIMIT, DEFAULT_LIMIT = 100, 50

READER = query_string("readerId", description="Whose read cursors decide `unread` and `readCursor`.")
LIST_PARAMETERS = [
    query_string(
        "state", enum=list(selectors.STATES), description="Attention filter (default: `default`, active or unread)."
    ),
    query_string("backendProfile", enum=list(PROFILES)),
    READER,
    query_cursor("cursor", "A version: the change feed, sessions changed after it, in version order."),
    query_cursor("updatedAfter", "Alias of `cursor`."),
    page_token_parameter("The previous page's `nextPageToken` (the sorted inbox; not with `cursor`)."),
    query_integer("limit", minimum=1, default=DEFAULT_LIMIT, description=f"Larger values are taken as {MAX_LIMIT}."),
]


def _reader(params) -> str | None:
    return query_identifier(params, "readerId")


def _summary(session, reader_id=None) -> dict:
    return SessionOut(reader_id=reader_id).to_representation(session)


class SessionViewSet(viewsets.ViewSet):
    schema = PageListSchema()
    lookup_value_regex = "[^/]+"
    roles = {
        "list": {CLIENT},
        "retrieve": {CLIENT},
        "update": {CLIENT},
        "read": {CLIENT},
        "storage": {RUNNER},
        "storage_evict": {RUNNER},
    }

    @extend_schema(operation_id="sessions_list", parameters=LIST_PARAMETERS, responses=SessionListOut)
    def list(self, request):
        params = request.query_params
        state = params.get("state") or "default"
        backend_profile = params.get("backendProfile") or None
        if backend_profile is not None:
            require_profile(backend_profile)
        reader_id = _reader(params)
        cursor_name = "cursor" if params.get("cursor") else "updatedAfter"
        cursor_given = params.get(cursor_name) or None
        cursor = (
            query_int(params, cursor_name, default=None, minimum=0, at_most=BIGINT_MAX)
            if cursor_given is not None
            else None
        )
        limit = query_int(params, "limit", default=DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
        page = selectors.session_list(
            scope=request.scope,
            state=state,
            backend_profile=backend_profile,
            reader_id=reader_id,
            cursor=cursor,
            page_token=query_identifier(params, "pageToken", max_length=PAGE_TOKEN_MAX_LENGTH),
            limit=limit,
        )
        serializer = SessionOut(reader_id=reader_id)
        items = [serializer.to_representation(session) for session in page.sessions]
        return Response(
            {
                "items": items,
                "count": len(items),
                "cursor": page.cursor,
                "nextPageToken": page.next_page_token,
                "filters": {
                    "state": state,
                    "backendProfile": backend_profile,
                    "readerId": reader_id,
                    "cursor": cursor_given,
                    "limit": limit,
                },
            }
        )

    @extend_schema(parameters=[READER], responses=SessionOut)
    def retrieve(self, request, pk=None):
        reader_id = _reader(request.query_params)
        session = selectors.session_with_cursor(session_id=pk, reader_id=reader_id, scope=request.scope)
        return Response(_summary(session, reader_id))

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
        if data.get("sessionId") not in (None, pk):
            raise invalid("sessionId in the body must match the path", field="sessionId")
        tenant_id, project_id = request.scope.fill(data.get("tenantId"), data.get("projectId"))
        session, created = services.session_upsert(
            session_id=pk,
            tenant_id=tenant_id,
            project_id=project_id,
            backend_profile=require_profile(data["backendProfile"]),
            conversation_id=data.get("conversationId"),
            thread_id=data.get("threadId"),
            metadata=data.get("metadata"),
            expires_at=parse_iso(data.get("expiresAt"), field="expiresAt"),
            codex_rollout_subdir=data.get("codexRolloutSubdir"),
        )
        return Response(_summary(session), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(request=ReadIn, responses=ReadCursorOut)
    @action(detail=True, methods=["post"])
    def read(self, request, pk=None):
        data = validated(ReadIn, request.data)
        cursor = services.session_mark_read(session_id=pk, reader_id=data["readerId"], scope=request.scope)
        return Response(ReadCursorOut().to_representation(cursor))

    @extend_schema(request=StorageIn, responses=SessionOut)
    @action(detail=True, methods=["post"])
    def storage(self, request, pk=None):
        data = validated(StorageIn, request.data)
        session = services.session_storage_refresh(
            session_id=pk,
            storage_kind=data["storageKind"],
            pvc_name=data.get("pvcName"),
            namespace=data.get("storageNamespace"),
            pvc_phase=data.get("pvcPhase"),
            size_bytes=data.get("storageSizeBytes"),
            files_count=data.get("storageFilesCount"),
            sha256=data.get("storageSha256"),
            codex_rollout_subdir=data.get("codexRolloutSubdir"),
            scope=request.scope,
        )
        return Response(_summary(session))

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
        session = services.session_storage_evict(session_id=pk, pvc_name=data["pvcName"], scope=request.scope)
        return Response(_summary(session))
