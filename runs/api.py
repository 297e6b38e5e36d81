"""Thin views: parse, call one service or selector, render."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from django.http import HttpResponseBase
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_view,
)
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from agentrun import live, notify
from agentrun.auth import Role
from agentrun.errors import invalid
from agentrun.fields import validated
from agentrun.openapi import error
from agentrun.vocabulary import EVENT_TYPES
from agentrun.wire import RecordSerializer, page
from runs import selectors, services
from runs.serializers import (
    CancelIn,
    ClaimIn,
    CommandCreateIn,
    CommandOut,
    CommandPageOut,
    CommandPageQuery,
    EventAppendBatchIn,
    EventAppendOneIn,
    EventOut,
    EventPageOut,
    EventPageQuery,
    FinishIn,
    HeartbeatIn,
    LeaseIn,
    RunCreateIn,
    RunnerJobIn,
    RunnerJobOut,
    RunnerJobPageOut,
    RunnerJobQuery,
    RunnerOut,
    RunnerRegisterIn,
    RunOut,
    RunStreamQuery,
    SessionEventPageOut,
    SessionEventQuery,
    SessionStreamQuery,
    parse_event_append,
)
from runs.streams import VIEWS, RunFeed, SessionFeed

# What the schema says of the routes' own errors; `agentrun.openapi` adds what every route answers.
LEASE_CONFLICT = error(
    "`runner-lease-conflict`: `runnerId` is not the run's holder, or `leaseEpoch` is not its "
    "current epoch (a newer claim took the lease); nothing was written."
)
TERMINAL_RUN = (
    "the run is terminal: the kind is its `failureKind`, else `cancelled` when it was cancelled, else `schema-invalid`."
)
IDEMPOTENCY_CONFLICT = "`schema-invalid`: the idempotency key was used before with another body."
EVENT_APPEND = PolymorphicProxySerializer(
    component_name="EventAppend", serializers=[EventAppendOneIn, EventAppendBatchIn], resource_type_field_name=None
)
EVENT_APPENDED = PolymorphicProxySerializer(
    component_name="EventAppended", serializers=[EventOut, EventPageOut], resource_type_field_name=None
)


def _content_length(request) -> int | None:
    try:
        return int(request.META.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None


def _render(record, serializer_class: type[RecordSerializer], *, created: bool | None = None) -> Response:
    """`record` as `serializer_class` renders it; 201 or 200 for a create (`created`), else 200."""
    code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return Response(serializer_class().to_representation(record), status=code)


class _Page:
    """A seq page. Its JSON is rendered once, however many woken waiters share the page."""

    __slots__ = ("_body", "after_seq", "head", "items", "page_serializer")

    def __init__(self, items: list, page_serializer: type[RecordSerializer], after_seq: int, head: dict | None):
        self.items, self.page_serializer, self.after_seq, self.head = items, page_serializer, after_seq, head
        self._body: bytes | None = None

    def __bool__(self) -> bool:
        return bool(self.items)

    def body(self) -> bytes:
        if self._body is None:
            cursor = str(self.items[-1].seq) if self.items else str(self.after_seq)
            record = self.page_serializer().to_representation(page(self.items, cursor=cursor, **(self.head or {})))
            # The bytes DRF's JSONRenderer writes (compact, UTF-8), without its per-request cost.
            self._body = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
        return self._body


def _page(
    request,
    *,
    run_id: str,
    query: dict,
    fetch: Callable[..., list],
    page_serializer: type[RecordSerializer],
    head: dict | None = None,
) -> HttpResponseBase:
    """A seq page of `query` (`EventPageQuery`), long-polled when `wait` is given. An empty page
    echoes afterSeq. `head`: the page's keys before its items (a session's trace names its
    session and run)."""
    after_seq, limit = query["after_seq"], query["limit"]
    return live.long_poll(
        request,
        notify.run_topic(run_id),
        timeout=query["wait"],
        fetch=lambda: _Page(fetch(run_id=run_id, after_seq=after_seq, limit=limit), page_serializer, after_seq, head),
        # Waiters share a page only when they would render the same bytes.
        share_key=(fetch.__name__, after_seq, limit, page_serializer, tuple((head or {}).items())),
        render=lambda found: (found or _Page([], page_serializer, after_seq, head)).body(),
    )


# One SSE event as clients see it (the schema of each event of a text/event-stream answer).
SSE_EVENT = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string", "maxLength": 230, "description": "The event's cursor: its seq, or `runId:seq`."},
        "event": {"type": "string", "enum": sorted(EVENT_TYPES)},
        "data": {
            "type": "string",
            "maxLength": 2 * 1024 * 1024,
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/EventOut"},
        },
    },
}
SSE_RESPONSE = OpenApiResponse(
    SSE_EVENT,
    description="`text/event-stream`: a `retry:` hint, then one event per row (`id:` its cursor, `event:` its "
    "type, `data:` the event as the list routes render it) and a `: keepalive` comment every 15 s. Resume with "
    "`Last-Event-ID` (or the query's cursor): nothing is skipped and nothing repeated. A stream also ends "
    "cleanly after an hour (`AGENTRUN_STREAM_MAX_SECONDS`); clients reconnect.",
)


def _resume_header(description: str) -> OpenApiParameter:
    return OpenApiParameter(
        "Last-Event-ID", {"type": "string", "maxLength": 230}, OpenApiParameter.HEADER, description=description
    )


def _last_event_id(request) -> str | None:
    value = request.headers.get("Last-Event-ID")
    return value.strip() if value is not None and value.strip() else None


def _seq(value: str, name: str) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise invalid(f"{name} must be an event seq (an integer of 0 or more)", parameter=name)
    return int(value)


class StreamNegotiation:
    """Stream routes answer `text/event-stream` and, before the stream starts, errors in the JSON
    envelope, whatever Accept says (`Accept: text/event-stream` is what SSE clients send)."""

    stream_actions: frozenset[str] = frozenset()

    def perform_content_negotiation(self, request, force=False):
        if getattr(self, "action", None) in self.stream_actions:
            renderer = JSONRenderer()
            return renderer, renderer.media_type
        return super().perform_content_negotiation(request, force)


# `finish` (the lease holder ends it) and `cancel` (a client does), the same for a run and a
# command: the viewset names its record, the services and the argument its path id fills, and
# documents the record they answer with (`extend_schema_view`). (A comment: the schema would
# show a docstring on every operation of the viewsets.)
class EndActions:
    record: type[RecordSerializer]
    path_argument: str
    finish_service: Callable[..., Any]
    cancel_service: Callable[..., Any]

    @extend_schema(request=FinishIn)
    @action(detail=True, methods=["post"])
    def finish(self, request, pk=None):
        data = validated(FinishIn, request.data)
        ended = self.finish_service(**{self.path_argument: pk}, **data, scope=request.scope)
        return _render(ended, self.record)

    @extend_schema(request=CancelIn)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        data = validated(CancelIn, request.data)
        return _render(self.cancel_service(**{self.path_argument: pk}, **data, scope=request.scope), self.record)


@extend_schema_view(
    finish=extend_schema(responses={200: RunOut, 409: LEASE_CONFLICT}),
    cancel=extend_schema(responses=RunOut),
)
class RunViewSet(StreamNegotiation, EndActions, viewsets.ViewSet):
    lookup_value_regex = "[^/]+"
    stream_actions = frozenset({"events_stream"})
    roles = {
        "events_stream": {Role.CLIENT, Role.RUNNER},
        "create": {Role.CLIENT},
        "retrieve": {Role.CLIENT, Role.RUNNER},
        "cancel": {Role.CLIENT},
        "claim": {Role.RUNNER},
        "heartbeat": {Role.RUNNER},
        "finish": {Role.RUNNER},
        "events:GET": {Role.CLIENT, Role.RUNNER},
        "events:POST": {Role.RUNNER},
        "commands:GET": {Role.CLIENT, Role.RUNNER},
        "commands:POST": {Role.CLIENT},
        "runner_jobs": {Role.RUNNER},
    }
    record = RunOut
    path_argument = "run_id"
    finish_service = staticmethod(services.run_finish)
    cancel_service = staticmethod(services.run_cancel)

    @extend_schema(
        request=RunCreateIn,
        responses={
            201: RunOut,
            200: RunOut,
            403: error(
                "`tenant-policy-denied`: `tenantId`/`projectId` is outside the key's scope, or `sessionRef` "
                "names a session of another tenant or project."
            ),
            409: error(IDEMPOTENCY_CONFLICT),
        },
    )
    def create(self, request):
        data = validated(RunCreateIn, request.data)
        tenant_id, project_id = request.scope.fill(data.pop("tenant_id", None), data.pop("project_id", None))
        # Keys no field names are kept with the run and answered with it (RunOut.extra_keys_from).
        known = set(RunCreateIn().fields) | set(RunOut().fields)
        extra = {key: value for key, value in request.data.items() if key not in known}
        run, created = services.run_create(tenant_id=tenant_id, project_id=project_id, extra=extra, **data)
        return _render(run, RunOut, created=created)

    @extend_schema(responses=RunOut)
    def retrieve(self, request, pk=None):
        return _render(selectors.run_get(run_id=pk, scope=request.scope), RunOut)

    @extend_schema(
        request=ClaimIn,
        responses={
            200: RunOut,
            409: error(f"`runner-lease-conflict`: another runner holds a live lease; or {TERMINAL_RUN}"),
        },
    )
    @action(detail=True, methods=["post"])
    def claim(self, request, pk=None):
        data = validated(ClaimIn, request.data)
        return _render(services.run_claim(run_id=pk, **data, scope=request.scope), RunOut)

    @extend_schema(request=HeartbeatIn, responses={200: RunOut, 409: LEASE_CONFLICT})
    @action(detail=True, methods=["post"])
    def heartbeat(self, request, pk=None):
        data = validated(HeartbeatIn, request.data)
        return _render(services.run_heartbeat(run_id=pk, **data, scope=request.scope), RunOut)

    @extend_schema(methods=["GET"], parameters=[EventPageQuery], responses=EventPageOut)
    @extend_schema(
        methods=["POST"],
        request=EVENT_APPEND,
        responses={
            201: EVENT_APPENDED,
            200: EVENT_APPENDED,
            409: error(
                "`runner-lease-conflict`: not the holder of the run's current lease (after a finish, only the "
                "last epoch may still append); `schema-invalid`: `batchKey` was used before with other events."
            ),
            413: error(
                "`schema-invalid`: one event's payload is over 256 KiB of JSON (`details`: `index`, `bytes`, "
                "`limitBytes`); nothing of the batch was written."
            ),
        },
    )
    @action(detail=True, methods=["get", "post"])
    def events(self, request, pk=None):
        if request.method == "GET":
            selectors.run_exists(run_id=pk, scope=request.scope)
            query = validated(EventPageQuery, request.query_params)
            return _page(request, run_id=pk, query=query, fetch=selectors.event_list, page_serializer=EventPageOut)
        body = parse_event_append(request.data, body_bytes=_content_length(request))
        events, created = services.event_append(
            run_id=pk,
            runner_id=body["runner_id"],
            lease_epoch=body["lease_epoch"],
            events=body["events"],
            batch_key=body["batch_key"],
            scope=request.scope,
        )
        if not body["batch"]:
            return _render(events[0], EventOut, created=created)
        return _render(page(events, cursor=str(events[-1].seq)), EventPageOut, created=created)

    @extend_schema(
        parameters=[
            RunStreamQuery,
            _resume_header("The last seq read: resume after it."),
        ],
        responses={
            (200, "text/event-stream"): SSE_RESPONSE,
            204: OpenApiResponse(
                description="The run has ended and nothing follows the given cursor: there is nothing to stream "
                "(SSE clients stop reconnecting on 204)."
            ),
        },
    )
    @action(detail=True, methods=["get"], url_path="events/stream")
    def events_stream(self, request, pk=None):
        """The run's events as they are appended (SSE); the stream ends after `terminal_status`."""
        selectors.run_exists(run_id=pk, scope=request.scope)
        query = validated(RunStreamQuery, request.query_params)
        if query["view"] not in VIEWS:
            raise invalid(f"view must be one of {', '.join(VIEWS)}", parameter="view")
        resume = _last_event_id(request)
        after_seq = _seq(resume, "Last-Event-ID") if resume is not None else query["after_seq"]
        return live.stream(request, RunFeed(pk, query["view"]), after_seq)

    @extend_schema(methods=["GET"], parameters=[CommandPageQuery], responses=CommandPageOut)
    @extend_schema(
        methods=["POST"],
        request=CommandCreateIn,
        responses={
            201: CommandOut,
            200: CommandOut,
            409: error(f"{IDEMPOTENCY_CONFLICT} Or {TERMINAL_RUN}"),
        },
    )
    @action(detail=True, methods=["get", "post"])
    def commands(self, request, pk=None):
        if request.method == "GET":
            selectors.run_exists(run_id=pk, scope=request.scope)
            query = validated(CommandPageQuery, request.query_params)
            return _page(request, run_id=pk, query=query, fetch=selectors.command_list, page_serializer=CommandPageOut)
        data = validated(CommandCreateIn, request.data)
        command, created = services.command_create(run_id=pk, **data, scope=request.scope)
        return _render(command, CommandOut, created=created)

    @extend_schema(methods=["GET"], parameters=[RunnerJobQuery], responses=RunnerJobPageOut)
    @extend_schema(
        methods=["POST"],
        request=RunnerJobIn,
        responses={
            201: RunnerJobOut,
            200: RunnerJobOut,
            404: error("`schema-invalid`: no runner job with this `id`."),
            409: error(f"{IDEMPOTENCY_CONFLICT} Or the job `id` belongs to another run."),
        },
    )
    @action(detail=True, methods=["get", "post"], url_path="runner-jobs")
    def runner_jobs(self, request, pk=None):
        if request.method == "GET":
            selectors.run_exists(run_id=pk, scope=request.scope)
            query = validated(RunnerJobQuery, request.query_params)
            jobs = selectors.runner_job_list(run_id=pk, **query)
            return _render(page(jobs, cursor=None), RunnerJobPageOut)
        fields = validated(RunnerJobIn, request.data)
        job, created = services.runner_job_save(
            run_id=pk,
            job_id=fields.pop("job_id", None),
            idempotency_key=fields.pop("idempotency_key", None),
            fields=fields,
            scope=request.scope,
        )
        return _render(job, RunnerJobOut, created=created)


@extend_schema_view(
    finish=extend_schema(responses={200: CommandOut, 409: LEASE_CONFLICT}),
    cancel=extend_schema(responses=CommandOut),
)
class CommandViewSet(EndActions, viewsets.ViewSet):
    lookup_value_regex = "[^/]+"
    roles = {
        "retrieve": {Role.CLIENT, Role.RUNNER},
        "ack": {Role.RUNNER},
        "finish": {Role.RUNNER},
        "cancel": {Role.CLIENT},
    }
    record = CommandOut
    path_argument = "command_id"
    finish_service = staticmethod(services.command_finish)
    cancel_service = staticmethod(services.command_cancel)

    @extend_schema(responses=CommandOut)
    def retrieve(self, request, pk=None):
        return _render(selectors.command_get(command_id=pk, scope=request.scope), CommandOut)

    @extend_schema(request=LeaseIn, responses={200: CommandOut, 409: LEASE_CONFLICT})
    @action(detail=True, methods=["post"])
    def ack(self, request, pk=None):
        data = validated(LeaseIn, request.data)
        return _render(services.command_ack(command_id=pk, **data, scope=request.scope), CommandOut)


class RunnerViewSet(viewsets.ViewSet):
    roles = {"create": {Role.RUNNER}}

    @extend_schema(
        request=RunnerRegisterIn,
        responses={
            201: RunnerOut,
            200: RunnerOut,
            403: error("`tenant-policy-denied`: this runnerId belongs to another tenant."),
        },
    )
    def create(self, request):
        data = validated(RunnerRegisterIn, request.data)
        attributes = request.data if isinstance(request.data, dict) else {}
        runner, created = services.runner_register(
            tenant_id=request.scope.tenant_id, runner_id=data.get("runner_id"), attributes=attributes
        )
        return _render(runner, RunnerOut, created=created)


class SessionEventViewSet(StreamNegotiation, viewsets.ViewSet):
    """A session's events: those of its active run, else its last run, else of `runId`."""

    lookup_value_regex = "[^/]+"
    stream_actions = frozenset({"output_stream"})
    roles = {"trace": {Role.CLIENT}, "output": {Role.CLIENT}, "output_stream": {Role.CLIENT}}

    def _events(self, request, session_id: str, fetch: Callable[..., list]) -> HttpResponseBase:
        query = validated(SessionEventQuery, request.query_params)
        run_id = selectors.session_run_id(session_id=session_id, run_id=query["run_id"], scope=request.scope)
        head = {"sessionId": session_id, "runId": run_id}
        if run_id is None:
            return _render(page([], cursor=str(query["after_seq"]), **head), SessionEventPageOut)
        return _page(request, run_id=run_id, query=query, fetch=fetch, page_serializer=SessionEventPageOut, head=head)

    @extend_schema(
        parameters=[SessionEventQuery],
        responses={
            200: SessionEventPageOut,
            404: error("`schema-invalid`: no such session, or `runId` is not one of its runs."),
        },
    )
    @action(detail=True, methods=["get"])
    def trace(self, request, pk=None):
        return self._events(request, pk, selectors.event_list)

    @extend_schema(
        parameters=[SessionEventQuery],
        responses={
            200: SessionEventPageOut,
            404: error("`schema-invalid`: no such session, or `runId` is not one of its runs."),
        },
    )
    @action(detail=True, methods=["get"])
    def output(self, request, pk=None):
        """Only output events (SPEC §4.10), filtered before the limit (A3)."""
        return self._events(request, pk, selectors.output_event_list)

    @extend_schema(
        parameters=[
            SessionStreamQuery,
            _resume_header("The last id read (`runId:seq`): resume after it."),
        ],
        responses={
            (200, "text/event-stream"): SSE_RESPONSE,
            404: error("`schema-invalid`: no such session, or `runId` is not one of its runs."),
        },
    )
    @action(detail=True, methods=["get"], url_path="output/stream")
    def output_stream(self, request, pk=None):
        """The session's output events (SSE), run after run: its current run's, then each next
        run's as it is created. Ids are `runId:seq`."""
        query = validated(SessionStreamQuery, request.query_params)
        resume = _last_event_id(request)
        run_id, after_seq = query["run_id"], query["after_seq"]
        if resume is not None:
            run_part, _, seq_part = resume.rpartition(":")
            if not run_part:
                raise invalid("Last-Event-ID must be runId:seq, as the stream's ids are", parameter="Last-Event-ID")
            run_id, after_seq = run_part, _seq(seq_part, "Last-Event-ID")
        run_id = selectors.session_run_id(session_id=pk, run_id=run_id, scope=request.scope)
        return live.stream(request, SessionFeed(pk), (run_id, after_seq if run_id else 0))
