"""Thin views: parse, call one service or selector, render."""

from __future__ import annotations

import json

from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema
from rest_framework import status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from agentrun import notify
from agentrun.fields import BIGINT_MAX, validated
from agentrun.openapi import error, page_parameters, query_string
from agentrun.wire import query_identifier, query_int, query_wait
from runs import selectors, services
from runs.serializers import (
    CancelIn,
    ClaimIn,
    CommandCreateIn,
    CommandOut,
    CommandPageOut,
    EventAppendBatchIn,
    EventAppendOneIn,
    EventOut,
    EventPageOut,
    FinishIn,
    HeartbeatIn,
    LeaseIn,
    RunCreateIn,
    RunnerJobIn,
    RunnerJobOut,
    RunnerJobPageOut,
    RunnerOut,
    RunnerRegisterIn,
    RunOut,
    SessionEventPageOut,
    parse_event_append,
    render_page,
)

CLIENT, RUNNER = "client", "runner"
MAX_EVENTS_PAGE = 500
MAX_COMMANDS_PAGE = 100
DEFAULT_PAGE = 100

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


def _created(record, created: bool, serializer_class) -> Response:
    return Response(
        serializer_class().to_representation(record), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
    )


class _Page:
    """A seq page. Its JSON is rendered once, however many woken waiters share the page."""

    __slots__ = ("_body", "after_seq", "head", "items", "serializer_class")

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
            self._body = json.dumps(
                {**self.head, **page} if self.head else page, ensure_ascii=False, separators=(",", ":")
            ).encode()
        return self._body


def _page_parameters(request, maximum: int) -> tuple[int, int, float]:
    after_seq = query_int(request.query_params, "afterSeq", default=0, minimum=0, at_most=BIGINT_MAX)
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
        run = services.run_claim(run_id=pk, runner_id=data["runnerId"], lease_ms=data["leaseMs"], scope=request.scope)
        return Response(RunOut().to_representation(run))

    @extend_schema(request=HeartbeatIn, responses={200: RunOut, 409: LEASE_CONFLICT})
    @action(detail=True, methods=["post"])
    def heartbeat(self, request, pk=None):
        data = validated(HeartbeatIn, request.data)
        run = services.run_heartbeat(
            run_id=pk,
            runner_id=data["runnerId"],
            lease_epoch=data["leaseEpoch"],
            lease_ms=data["leaseMs"],
            scope=request.scope,
        )
        return Response(RunOut().to_representation(run))

    @extend_schema(request=FinishIn, responses={200: RunOut, 409: LEASE_CONFLICT})
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

    @extend_schema(methods=["GET"], parameters=page_parameters(maximum=MAX_EVENTS_PAGE), responses=EventPageOut)
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
            return _page(
                request, run_id=pk, maximum=MAX_EVENTS_PAGE, fetch=selectors.event_list, serializer_class=EventOut
            )
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

    @extend_schema(methods=["GET"], parameters=page_parameters(maximum=MAX_COMMANDS_PAGE), responses=CommandPageOut)
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
            return _page(
                request, run_id=pk, maximum=MAX_COMMANDS_PAGE, fetch=selectors.command_list, serializer_class=CommandOut
            )
        data = validated(CommandCreateIn, request.data)
        command, created = services.command_create(
            run_id=pk,
            command_type=data["type"],
            payload=data["payload"],
            idempotency_key=data.get("idempotencyKey"),
            scope=request.scope,
        )
        return _created(command, created, CommandOut)

    @extend_schema(
        methods=["GET"],
        parameters=[query_string("commandId", description="Only this command's jobs.")],
        responses=RunnerJobPageOut,
    )
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
            command_id = query_identifier(request.query_params, "commandId")
            jobs = selectors.runner_job_list(run_id=pk, command_id=command_id)
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
            run_id=pk,
            fields=fields,
            job_id=data.get("id"),
            idempotency_key=data.get("idempotencyKey"),
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

    @extend_schema(request=LeaseIn, responses={200: CommandOut, 409: LEASE_CONFLICT})
    @action(detail=True, methods=["post"])
    def ack(self, request, pk=None):
        data = validated(LeaseIn, request.data)
        command = services.command_ack(
            command_id=pk, runner_id=data["runnerId"], lease_epoch=data["leaseEpoch"], scope=request.scope
        )
        return Response(CommandOut().to_representation(command))

    @extend_schema(request=FinishIn, responses={200: CommandOut, 409: LEASE_CONFLICT})
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
            tenant_id=request.scope.tenant_id, runner_id=data.get("runnerId"), attributes=attributes
        )
        return _created(runner, created, RunnerOut)


SESSION_EVENT_PARAMETERS = [
    query_string("runId", description="One of the session's runs (default: its active run, else its last)."),
    *page_parameters(maximum=MAX_EVENTS_PAGE),
]


class SessionEventViewSet(viewsets.ViewSet):
    """A session's events: those of its active run, else its last run, else of `runId`."""

    lookup_value_regex = "[^/]+"
    roles = {"trace": {CLIENT}, "output": {CLIENT}}

    def _events(self, request, session_id: str, fetch) -> HttpResponse:
        run_id = query_identifier(request.query_params, "runId")
        run_id = selectors.session_run_id(session_id=session_id, run_id=run_id, scope=request.scope)
        head = {"sessionId": session_id, "runId": run_id}
        if run_id is None:
            after_seq, _, _ = _page_parameters(request, MAX_EVENTS_PAGE)
            return Response({**head, "items": [], "count": 0, "cursor": str(after_seq)})
        return _page(request, run_id=run_id, maximum=MAX_EVENTS_PAGE, fetch=fetch, serializer_class=EventOut, head=head)

    @extend_schema(
        parameters=SESSION_EVENT_PARAMETERS,
        responses={
            200: SessionEventPageOut,
            404: error("`schema-invalid`: no such session, or `runId` is not one of its runs."),
        },
    )
    @action(detail=True, methods=["get"])
    def trace(self, request, pk=None):
        return self._events(request, pk, selectors.event_list)

    @extend_schema(
        parameters=SESSION_EVENT_PARAMETERS,
        responses={
            200: SessionEventPageOut,
            404: error("`schema-invalid`: no such session, or `runId` is not one of its runs."),
        },
    )
    @action(detail=True, methods=["get"])
    def output(self, request, pk=None):
        """Only output events (SPEC §4.10), filtered before the limit (A3)."""
        return self._events(request, pk, selectors.output_event_list)
