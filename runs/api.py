"""Thin views: parse, call one service or selector, render."""

from __future__ import annotations

import json

from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from agentrun import notify
from agentrun.fields import validated
from agentrun.wire import query_int, query_wait
from runs import selectors, services
from runs.serializers import (
    CancelIn,
    ClaimIn,
    CommandCreateIn,
    CommandOut,
    EventAppendIn,
    EventOut,
    FinishIn,
    HeartbeatIn,
    LeaseIn,
    RunCreateIn,
    RunnerJobIn,
    RunnerJobOut,
    RunnerOut,
    RunnerRegisterIn,
    RunOut,
    parse_event_append,
    render_page,
)

CLIENT, RUNNER = "client", "runner"
MAX_EVENTS_PAGE = 500
MAX_COMMANDS_PAGE = 100
DEFAULT_PAGE = 100

PAGE_PARAMETERS = [
    OpenApiParameter("afterSeq", int, description="Only items with a greater seq (default 0)."),
    OpenApiParameter("limit", int, description="Page size, clamped to the maximum."),
    OpenApiParameter("wait", float, description="Seconds to wait for a first item (0-30)."),
]


def _content_length(request) -> int | None:
    try:
        return int(request.META.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None


def _created(record, created: bool, serializer_class) -> Response:
    return Response(
        serializer_class().to_representation(record), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
    )


class _Page:
    """A seq page. Its JSON is rendered once, however many woken waiters share the page."""

    __slots__ = ("items", "serializer_class", "after_seq", "head", "_body")

    def __init__(self, items, serializer_class, after_seq: int, head: dict | None = None):
        self.items, self.serializer_class, self.after_seq, self.head = items, serializer_class, after_seq, head
        self._body = None

    def __bool__(self) -> bool:
        return bool(self.items)

    def body(self) -> bytes:
        if self._body is None:
            cursor = str(self.items[-1].seq) if self.items else str(self.after_seq)
            # The bytes DRF's JSONRenderer writes (compact, UTF-8), without its per-request cost.
            page = render_page(self.items, self.serializer_class, cursor=cursor)
            self._body = json.dumps({**self.head, **page} if self.head else page, ensure_ascii=False,
                                    separators=(",", ":")).encode()
        return self._body


def _page_parameters(request, maximum: int) -> tuple[int, int, float]:
    after_seq = query_int(request.query_params, "afterSeq", default=0, minimum=0)
    limit = query_int(request.query_params, "limit", default=DEFAULT_PAGE, minimum=1, maximum=maximum)
    wait = query_wait(request.query_params, maximum=settings.AGENTRUN_MAX_WAIT_SECONDS)
    return after_seq, limit, wait


def _page(request, *, run_id: str, maximum: int, fetch, serializer_class, head: dict | None = None) -> HttpResponse:
    """A seq page, long-polled when `wait` is given. An empty page echoes afterSeq. `head` goes
    before the page's keys (a session's trace names its session and run)."""
    after_seq, limit, wait = _page_parameters(request, maximum)
    return notify.long_poll(
        notify.run_topic(run_id),
        timeout=wait,
        fetch=lambda: _Page(fetch(run_id=run_id, after_seq=after_seq, limit=limit), serializer_class, after_seq, head),
        share_key=(fetch.__name__, after_seq, limit),
        render=lambda page: (page or _Page([], serializer_class, after_seq, head)).body(),
    )


class RunViewSet(viewsets.ViewSet):
    lookup_value_regex = "[^/]+"
    roles = {
        "create": {CLIENT},
        "retrieve": {CLIENT, RUNNER},
        "cancel": {CLIENT},
        "claim": {RUNNER},
        "heartbeat": {RUNNER},
        "finish": {RUNNER},
        "events:GET": {CLIENT, RUNNER},
        "events:POST": {RUNNER},
        "commands:GET": {CLIENT, RUNNER},
        "commands:POST": {CLIENT},
        "runner_jobs": {RUNNER},
    }

    @extend_schema(request=RunCreateIn, responses={201: RunOut, 200: RunOut})
    def create(self, request):
        data = validated(RunCreateIn, request.data)
        tenant_id, project_id = request.scope.fill(data.get("tenantId"), data.get("projectId"))
        known = set(RunCreateIn().fields)
        extra = {key: value for key, value in request.data.items() if key not in known and key not in RunOut().fields}
        run, created = services.run_create(
            tenant_id=tenant_id,
            project_id=project_id,
            backend_profile=data["backendProfile"],
            session_ref=data.get("sessionRef"),
            resource_bundle_ref=data.get("resourceBundleRef"),
            provider_id=data.get("providerId"),
            workspace_ref=data.get("workspaceRef"),
            execution_policy=data.get("executionPolicy"),
            metadata=data.get("metadata"),
            extra=extra,
            idempotency_key=data.get("idempotencyKey"),
        )
        return _created(run, created, RunOut)

    @extend_schema(responses=RunOut)
    def retrieve(self, request, pk=None):
        return Response(RunOut().to_representation(selectors.run_get(run_id=pk, scope=request.scope)))

    @extend_schema(request=ClaimIn, responses=RunOut)
    @action(detail=True, methods=["post"])
    def claim(self, request, pk=None):
        data = validated(ClaimIn, request.data)
        run = services.run_claim(run_id=pk, runner_id=data["runnerId"], lease_ms=data["leaseMs"], scope=request.scope)
        return Response(RunOut().to_representation(run))

    @extend_schema(request=HeartbeatIn, responses=RunOut)
    @action(detail=True, methods=["post"])
    def heartbeat(self, request, pk=None):
        data = validated(HeartbeatIn, request.data)
        run = services.run_heartbeat(
            run_id=pk, runner_id=data["runnerId"], lease_epoch=data["leaseEpoch"], lease_ms=data["leaseMs"],
            scope=request.scope,
        )
        return Response(RunOut().to_representation(run))

    @extend_schema(request=FinishIn, responses=RunOut)
    @action(detail=True, methods=["post"])
    def finish(self, request, pk=None):
        data = validated(FinishIn, request.data)
        run = services.run_finish(
            run_id=pk,
            runner_id=data["runnerId"],
            lease_epoch=data["leaseEpoch"],
            terminal_status=data["terminalStatus"],
            failure_kind=data.get("failureKind"),
            failure_message=data.get("failureMessage"),
            thread_id=data.get("threadId"),
            turn_id=data.get("turnId"),
            scope=request.scope,
        )
        return Response(RunOut().to_representation(run))

    @extend_schema(request=CancelIn, responses=RunOut)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        data = validated(CancelIn, request.data)
        run = services.run_cancel(run_id=pk, reason=data.get("reason"), scope=request.scope)
        return Response(RunOut().to_representation(run))

    @extend_schema(methods=["GET"], parameters=PAGE_PARAMETERS, responses=EventOut(many=True))
    @extend_schema(methods=["POST"], request=EventAppendIn, responses={201: EventOut, 200: EventOut})
    @action(detail=True, methods=["get", "post"])
    def events(self, request, pk=None):
        if request.method == "GET":
            selectors.run_exists(run_id=pk, scope=request.scope)
            return _page(request, run_id=pk, maximum=MAX_EVENTS_PAGE, fetch=selectors.event_list,
                         serializer_class=EventOut)
        body = parse_event_append(request.data, body_bytes=_content_length(request))
        events, created = services.event_append(
            run_id=pk,
            runner_id=body["runner_id"],
            lease_epoch=body["lease_epoch"],
            events=body["events"],
            batch_key=body["batch_key"],
            scope=request.scope,
        )
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        if not body["batch"]:
            return Response(EventOut().to_representation(events[0]), status=code)
        return Response(render_page(events, EventOut, cursor=str(events[-1].seq)), status=code)

    @extend_schema(methods=["GET"], parameters=PAGE_PARAMETERS, responses=CommandOut(many=True))
    @extend_schema(methods=["POST"], request=CommandCreateIn, responses={201: CommandOut, 200: CommandOut})
    @action(detail=True, methods=["get", "post"])
    def commands(self, request, pk=None):
        if request.method == "GET":
            selectors.run_exists(run_id=pk, scope=request.scope)
            return _page(request, run_id=pk, maximum=MAX_COMMANDS_PAGE, fetch=selectors.command_list,
                         serializer_class=CommandOut)
        data = validated(CommandCreateIn, request.data)
        command, created = services.command_create(
            run_id=pk,
            command_type=data["type"],
            payload=data["payload"],
            idempotency_key=data.get("idempotencyKey"),
            scope=request.scope,
        )
        return _created(command, created, CommandOut)

    @extend_schema(methods=["GET"], parameters=[OpenApiParameter("commandId", str)], responses=RunnerJobOut(many=True))
    @extend_schema(methods=["POST"], request=RunnerJobIn, responses={201: RunnerJobOut, 200: RunnerJobOut})
    @action(detail=True, methods=["get", "post"], url_path="runner-jobs")
    def runner_jobs(self, request, pk=None):
        if request.method == "GET":
            selectors.run_exists(run_id=pk, scope=request.scope)
            jobs = selectors.runner_job_list(run_id=pk, command_id=request.query_params.get("commandId") or None)
            return Response(render_page(jobs, RunnerJobOut, cursor=None))
        data = validated(RunnerJobIn, request.data)
        fields = {
            "command_id": data["commandId"],
            "payload_hash": data["payloadHash"],
            "attempt_id": data["attemptId"],
            "runner_id": data["runnerId"],
            "namespace": data["namespace"],
            "job_name": data["jobName"],
            "manager_url": data["managerUrl"],
            "image": data["image"],
            "source_commit": data["sourceCommit"],
            "service_account_name": data.get("serviceAccountName"),
            "result": data["result"],
        }
        job, created = services.runner_job_save(
            run_id=pk, fields=fields, job_id=data.get("id"), idempotency_key=data.get("idempotencyKey"),
            scope=request.scope,
        )
        return _created(job, created, RunnerJobOut)


class CommandViewSet(viewsets.ViewSet):
    lookup_value_regex = "[^/]+"
    roles = {
        "retrieve": {CLIENT, RUNNER},
        "ack": {RUNNER},
        "finish": {RUNNER},
        "cancel": {CLIENT},
    }

    @extend_schema(responses=CommandOut)
    def retrieve(self, request, pk=None):
        return Response(CommandOut().to_representation(selectors.command_get(command_id=pk, scope=request.scope)))

    @extend_schema(request=LeaseIn, responses=CommandOut)
    @action(detail=True, methods=["post"])
    def ack(self, request, pk=None):
        data = validated(LeaseIn, request.data)
        command = services.command_ack(
            command_id=pk, runner_id=data["runnerId"], lease_epoch=data["leaseEpoch"], scope=request.scope
        )
        return Response(CommandOut().to_representation(command))

    @extend_schema(request=FinishIn, responses=CommandOut)
    @action(detail=True, methods=["post"])
    def finish(self, request, pk=None):
        data = validated(FinishIn, request.data)
        command = services.command_finish(
            command_id=pk,
            runner_id=data["runnerId"],
            lease_epoch=data["leaseEpoch"],
            terminal_status=data["terminalStatus"],
            failure_kind=data.get("failureKind"),
            failure_message=data.get("failureMessage"),
            thread_id=data.get("threadId"),
            turn_id=data.get("turnId"),
            scope=request.scope,
        )
        return Response(CommandOut().to_representation(command))

    @extend_schema(request=CancelIn, responses=CommandOut)
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        data = validated(CancelIn, request.data)
        command = services.command_cancel(command_id=pk, reason=data.get("reason"), scope=request.scope)
        return Response(CommandOut().to_representation(command))


class RunnerViewSet(viewsets.ViewSet):
    roles = {"create": {RUNNER}}

    @extend_schema(request=RunnerRegisterIn, responses={201: RunnerOut, 200: RunnerOut})
    def create(self, request):
        data = validated(RunnerRegisterIn, request.data)
        attributes = request.data if isinstance(request.data, dict) else {}
        runner, created = services.runner_register(
            tenant_id=request.scope.tenant_id, runner_id=data.get("runnerId"), attributes=attributes
        )
        return _created(runner, created, RunnerOut)


class SessionEventViewSet(viewsets.ViewSet):
    """A session's events: those of its active run, else its last run, else of `runId`."""

    lookup_value_regex = "[^/]+"
    roles = {"trace": {CLIENT}, "output": {CLIENT}}

    def _events(self, request, session_id: str, fetch) -> HttpResponse:
        run_id = selectors.session_run_id(
            session_id=session_id, run_id=request.query_params.get("runId") or None, scope=request.scope
        )
        head = {"sessionId": session_id, "runId": run_id}
        if run_id is None:
            after_seq, _, _ = _page_parameters(request, MAX_EVENTS_PAGE)
            return Response({**head, "items": [], "count": 0, "cursor": str(after_seq)})
        return _page(request, run_id=run_id, maximum=MAX_EVENTS_PAGE, fetch=fetch, serializer_class=EventOut,
                     head=head)

    @extend_schema(parameters=[OpenApiParameter("runId", str), *PAGE_PARAMETERS], responses=EventOut(many=True))
    @action(detail=True, methods=["get"])
    def trace(self, request, pk=None):
        return self._events(request, pk, selectors.event_list)

    @extend_schema(parameters=[OpenApiParameter("runId", str), *PAGE_PARAMETERS], responses=EventOut(many=True))
    @action(detail=True, methods=["get"])
    def output(self, request, pk=None):
        """Only output events (SPEC §4.10), filtered before the limit (A3)."""
        return self._events(request, pk, selectors.output_event_list)
