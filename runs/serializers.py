"""Input serializers validate request bodies; output serializers render records in camelCase.

Output serializers declare their fields for the OpenAPI schema and render with plain dict
building, since event pages of 500 rows sit on the hot path.
"""

from __future__ import annotations

import json

from rest_framework import serializers

from agentrun import webhooks
from agentrun.errors import SCHEMA_INVALID, AgentRunError
from agentrun.fields import (
    BIGINT_MAX,
    IDENTIFIER_MAX_LENGTH,
    SESSION_ID_MAX_LENGTH,
    IdentifierField,
    JSONObjectField,
    StrictCharField,
    StrictIntegerField,
)
from agentrun.openapi import CURSOR_MAX_LENGTH, BackendProfileField, documented_enum
from agentrun.text import UNSTORABLE_MESSAGE, is_unstorable
from agentrun.vocabulary import COMMAND_TYPES, EVENT_TYPES, FAILURE_KINDS, TERMINAL_STATUSES
from agentrun.wire import (
    MAX_WAIT_SECONDS,
    QueryCursor,
    QueryIdentifier,
    QueryInteger,
    QueryText,
    QueryWait,
    RecordSerializer,
    TimestampField,
)
from runs.models import CommandState, RunStatus

MAX_LEASE_MS = 3_600_000
DEFAULT_LEASE_MS = 60_000
MAX_BATCH_EVENTS = 500
# One event's payload, as compact UTF-8 JSON (API.md).
MAX_EVENT_PAYLOAD_BYTES = 256 * 1024
MAX_FAILURE_MESSAGE = 10_000


# --- input --------------------------------------------------------------------------------


MAX_ATTEMPTS = 100
MAX_POLICY_SECONDS = {"backoffSeconds": 7 * 86400, "timeoutSeconds": 30 * 86400}


def validate_execution_policy(value):
    """maxAttempts 1 to 100, backoffSeconds 0 to a week, timeoutSeconds 0 to 30 days, retryOn of
    failure kinds."""
    if value is None:
        return value
    max_attempts = value.get("maxAttempts")
    if max_attempts is not None and (
        isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or not 1 <= max_attempts <= MAX_ATTEMPTS
    ):
        raise serializers.ValidationError(f"maxAttempts must be an integer from 1 to {MAX_ATTEMPTS}")
    for key, limit in MAX_POLICY_SECONDS.items():
        seconds = value.get(key)
        if seconds is not None and (
            isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= limit
        ):
            raise serializers.ValidationError(f"{key} must be a number of seconds from 0 to {limit}")
    retry_on = value.get("retryOn")
    if retry_on is not None and (
        not isinstance(retry_on, list) or not all(isinstance(kind, str) and kind in FAILURE_KINDS for kind in retry_on)
    ):
        raise serializers.ValidationError("retryOn must be a list of failure kinds")
    return value


def webhook_url_field(what: str) -> StrictCharField:
    """`webhookUrl` of a create body (a run's or a queue task's); validate_webhook_url checks it."""
    return StrictCharField(
        source="webhook_url",
        required=False,
        allow_null=True,
        allow_blank=True,
        max_length=webhooks.MAX_URL_LENGTH,
        help_text=f"Gets a signed POST when the {what} ends (README: Webhooks): http(s), not a private address.",
    )


class RunCreateIn(serializers.Serializer):
    tenantId = IdentifierField(source="tenant_id", required=False, allow_null=True, max_length=200)
    projectId = IdentifierField(source="project_id", required=False, allow_null=True, max_length=200)
    backendProfile = BackendProfileField(source="backend_profile", max_length=32)
    sessionRef = JSONObjectField(source="session_ref", required=False, allow_null=True)
    resourceBundleRef = JSONObjectField(source="resource_bundle_ref", required=False, allow_null=True)
    providerId = IdentifierField(source="provider_id", required=False, allow_null=True, max_length=200)
    workspaceRef = serializers.JSONField(source="workspace_ref", required=False, allow_null=True)
    executionPolicy = JSONObjectField(source="execution_policy", required=False, allow_null=True)
    metadata = JSONObjectField(required=False, allow_null=True)
    idempotencyKey = IdentifierField(
        source="idempotency_key", required=False, allow_null=True, allow_blank=True, max_length=200
    )
    webhookUrl = webhook_url_field("run")

    def validate_executionPolicy(self, value):
        return validate_execution_policy(value)

    def validate_webhookUrl(self, value):
        return validate_webhook_url(value)


def validate_webhook_url(value):
    try:
        return webhooks.validate_url(value)
    except AgentRunError as error:
        raise serializers.ValidationError(error.message) from None


class ClaimIn(serializers.Serializer):
    runnerId = IdentifierField(source="runner_id", max_length=200)
    leaseMs = StrictIntegerField(
        source="lease_ms", required=False, default=DEFAULT_LEASE_MS, min_value=1, max_value=MAX_LEASE_MS
    )


class HeartbeatIn(ClaimIn):
    leaseEpoch = StrictIntegerField(source="lease_epoch", min_value=0, max_value=BIGINT_MAX)


class FinishIn(serializers.Serializer):
    """A run's or a command's finish (the same body)."""

    runnerId = IdentifierField(source="runner_id", max_length=200)
    leaseEpoch = StrictIntegerField(source="lease_epoch", min_value=0, max_value=BIGINT_MAX)
    terminalStatus = serializers.ChoiceField(source="terminal_status", choices=sorted(TERMINAL_STATUSES))
    failureKind = serializers.ChoiceField(
        source="failure_kind", choices=sorted(FAILURE_KINDS), required=False, allow_null=True
    )
    failureMessage = StrictCharField(
        source="failure_message", required=False, allow_null=True, allow_blank=True, max_length=MAX_FAILURE_MESSAGE
    )
    threadId = IdentifierField(source="thread_id", required=False, allow_null=True, allow_blank=True, max_length=500)
    turnId = IdentifierField(source="turn_id", required=False, allow_null=True, allow_blank=True, max_length=500)


class CancelIn(serializers.Serializer):
    reason = StrictCharField(required=False, allow_null=True, allow_blank=True, max_length=2000)


class LeaseIn(serializers.Serializer):
    runnerId = IdentifierField(source="runner_id", max_length=200)
    leaseEpoch = StrictIntegerField(source="lease_epoch", min_value=0, max_value=BIGINT_MAX)


class EventIn(serializers.Serializer):
    """One event of a batch (the schema of what `parse_event_append` takes)."""

    type = serializers.ChoiceField(choices=sorted(EVENT_TYPES))
    payload = JSONObjectField(required=False, default=dict, help_text="At most 256 KiB of JSON.")


class EventAppendOneIn(serializers.Serializer):
    """One event. The body is parsed by hand (`parse_event_append`): a 500-event batch through
    nested DRF fields costs more than the insert. These serializers are its schema."""

    runnerId = IdentifierField(max_length=IDENTIFIER_MAX_LENGTH)
    leaseEpoch = StrictIntegerField(min_value=0, max_value=BIGINT_MAX)
    type = serializers.ChoiceField(choices=sorted(EVENT_TYPES))
    payload = JSONObjectField(required=False, default=dict, help_text="At most 256 KiB of JSON.")


class EventAppendBatchIn(serializers.Serializer):
    """A batch, all or nothing; a repeated `batchKey` with the same events replays (200)."""

    runnerId = IdentifierField(max_length=IDENTIFIER_MAX_LENGTH)
    leaseEpoch = StrictIntegerField(min_value=0, max_value=BIGINT_MAX)
    batchKey = IdentifierField(required=False, allow_null=True, allow_blank=True, max_length=IDENTIFIER_MAX_LENGTH)
    events = serializers.ListField(child=EventIn(), min_length=1, max_length=MAX_BATCH_EVENTS)


def parse_event_append(data, *, body_bytes: int | None = None) -> dict:
    """Validate an append body without DRF's per-item field machinery. `body_bytes`: the
    body's size, when known; a body no larger than the per-event limit needs no measuring
    (compact JSON of a part is never longer than the part as sent)."""
    if not isinstance(data, dict):
        raise serializers.ValidationError({"non_field_errors": ["body must be a JSON object"]})
    errors = {}
    runner_id = data.get("runnerId")
    if not isinstance(runner_id, str) or not runner_id or len(runner_id) > IDENTIFIER_MAX_LENGTH:
        errors["runnerId"] = [f"must be a non-empty string of at most {IDENTIFIER_MAX_LENGTH} characters"]
    elif is_unstorable(runner_id):
        errors["runnerId"] = [UNSTORABLE_MESSAGE]
    lease_epoch = data.get("leaseEpoch")
    if isinstance(lease_epoch, bool) or not isinstance(lease_epoch, int) or lease_epoch < 0:
        errors["leaseEpoch"] = ["must be a non-negative integer"]
    batch_key = data.get("batchKey")
    if batch_key is not None and (not isinstance(batch_key, str) or len(batch_key) > IDENTIFIER_MAX_LENGTH):
        errors["batchKey"] = [f"must be a string of at most {IDENTIFIER_MAX_LENGTH} characters"]
    elif isinstance(batch_key, str) and is_unstorable(batch_key):
        errors["batchKey"] = [UNSTORABLE_MESSAGE]
    if "events" in data:
        raw_events = data["events"]
        if not isinstance(raw_events, list) or not raw_events:
            errors["events"] = ["must be a non-empty list"]
            raw_events = []
        elif len(raw_events) > MAX_BATCH_EVENTS:
            errors["events"] = [f"a batch holds at most {MAX_BATCH_EVENTS} events"]
            raw_events = []
        batch = True
    else:
        raw_events = [data]
        batch = False
    events = []
    for index, item in enumerate(raw_events):
        if not isinstance(item, dict):
            errors[f"events[{index}]"] = ["must be an object"]
            continue
        event_type = item.get("type")
        payload = item.get("payload", {})
        if not isinstance(event_type, str):
            errors[f"events[{index}].type" if batch else "type"] = ["must be a string"]
        if not isinstance(payload, dict):
            errors[f"events[{index}].payload" if batch else "payload"] = ["must be a JSON object"]
        events.append((event_type, payload))
    if errors:
        raise serializers.ValidationError(errors)
    if body_bytes is None or body_bytes > MAX_EVENT_PAYLOAD_BYTES:
        _check_payload_sizes(events)
    return {
        "runner_id": runner_id,
        "lease_epoch": lease_epoch,
        "batch_key": batch_key or None,
        "events": events,
        "batch": batch,
    }


def payload_bytes(payload) -> int:
    """A payload's size as the limit counts it: compact JSON in UTF-8."""
    return len(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))


def _check_payload_sizes(events) -> None:
    for index, (_, payload) in enumerate(events):
        size = payload_bytes(payload)
        if size > MAX_EVENT_PAYLOAD_BYTES:
            raise AgentRunError(
                SCHEMA_INVALID,
                f"event {index}'s payload is {size} bytes of JSON; the limit is {MAX_EVENT_PAYLOAD_BYTES} "
                "(nothing of the batch was written)",
                status=413,
                details={"index": index, "bytes": size, "limitBytes": MAX_EVENT_PAYLOAD_BYTES},
            )


# An IdentifierField naming a command type (checked by `command_create`).
CommandTypeField = documented_enum(IdentifierField, COMMAND_TYPES)


class CommandCreateIn(serializers.Serializer):
    type = CommandTypeField(source="command_type", max_length=32)
    payload = JSONObjectField(required=False, default=dict)
    idempotencyKey = IdentifierField(
        source="idempotency_key", required=False, allow_null=True, allow_blank=True, max_length=200
    )


class RunnerRegisterIn(serializers.Serializer):
    runnerId = IdentifierField(source="runner_id", required=False, allow_null=True, max_length=200)


# `id` and `idempotencyKey` say which record; the other fields are its columns
# (`runner_job_save(fields=...)`).
class RunnerJobIn(serializers.Serializer):
    id = IdentifierField(source="job_id", required=False, allow_null=True, max_length=200)
    commandId = IdentifierField(source="command_id", max_length=64)
    idempotencyKey = IdentifierField(
        source="idempotency_key", required=False, allow_null=True, allow_blank=True, max_length=200
    )
    payloadHash = IdentifierField(source="payload_hash", max_length=200)
    attemptId = IdentifierField(source="attempt_id", max_length=200)
    runnerId = IdentifierField(source="runner_id", max_length=200)
    namespace = IdentifierField(max_length=253)
    jobName = IdentifierField(source="job_name", max_length=253)
    managerUrl = StrictCharField(source="manager_url", max_length=2000)
    image = StrictCharField(max_length=1000)
    sourceCommit = IdentifierField(source="source_commit", max_length=200)
    serviceAccountName = IdentifierField(
        source="service_account_name", required=False, allow_null=True, default=None, max_length=253
    )
    result = JSONObjectField(required=False, default=dict)


# --- output -------------------------------------------------------------------------------


class RunOut(RecordSerializer):
    """A run, with the keys of its create body that no field names."""

    extra_keys_from = "extra"

    id = serializers.CharField(max_length=64)
    tenantId = serializers.CharField(source="tenant_id", max_length=IDENTIFIER_MAX_LENGTH)
    projectId = serializers.CharField(source="project_id", max_length=IDENTIFIER_MAX_LENGTH)
    backendProfile = serializers.CharField(source="backend_profile", max_length=32)
    sessionRef = serializers.JSONField(source="session_ref", allow_null=True)
    resourceBundleRef = serializers.JSONField(source="resource_bundle_ref", allow_null=True)
    providerId = serializers.CharField(source="provider_id", allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    workspaceRef = serializers.JSONField(source="workspace_ref", allow_null=True)
    executionPolicy = serializers.JSONField(source="execution_policy", allow_null=True)
    metadata = serializers.JSONField(allow_null=True)
    idempotencyKey = serializers.CharField(source="idempotency_key", allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    webhookUrl = serializers.CharField(source="webhook_url", allow_null=True, max_length=webhooks.MAX_URL_LENGTH)
    status = serializers.ChoiceField(choices=RunStatus.values)
    terminalStatus = serializers.ChoiceField(
        source="terminal_status", choices=sorted(TERMINAL_STATUSES), allow_null=True
    )
    failureKind = serializers.CharField(source="failure_kind", allow_null=True, max_length=64)
    failureMessage = serializers.CharField(source="failure_message", allow_null=True, max_length=MAX_FAILURE_MESSAGE)
    claimedBy = serializers.CharField(source="claimed_by", allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    leaseExpiresAt = TimestampField(source="lease_expires_at", allow_null=True)
    leaseEpoch = serializers.IntegerField(source="lease_epoch", min_value=0)
    createdAt = TimestampField(source="created_at")
    updatedAt = TimestampField(source="updated_at")


class EventOut(RecordSerializer):
    id = serializers.CharField(max_length=64)
    runId = serializers.CharField(source="run_id", max_length=64)
    seq = serializers.IntegerField(min_value=1)
    type = serializers.CharField(max_length=32)
    payload = JSONObjectField()
    createdAt = TimestampField(source="created_at")


class CommandOut(RecordSerializer):
    id = serializers.CharField(max_length=64)
    runId = serializers.CharField(source="run_id", max_length=64)
    seq = serializers.IntegerField(min_value=1)
    type = serializers.ChoiceField(choices=sorted(COMMAND_TYPES))
    payload = JSONObjectField()
    idempotencyKey = serializers.CharField(source="idempotency_key", allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    payloadHash = serializers.CharField(source="payload_hash", max_length=64)
    state = serializers.ChoiceField(choices=CommandState.values)
    acknowledgedAt = TimestampField(source="acknowledged_at", allow_null=True)
    terminalStatus = serializers.ChoiceField(
        source="terminal_status", choices=sorted(TERMINAL_STATUSES), allow_null=True
    )
    failureKind = serializers.CharField(source="failure_kind", allow_null=True, max_length=64)
    failureMessage = serializers.CharField(source="failure_message", allow_null=True, max_length=MAX_FAILURE_MESSAGE)
    threadId = serializers.CharField(source="thread_id", allow_null=True, max_length=500)
    turnId = serializers.CharField(source="turn_id", allow_null=True, max_length=500)
    createdAt = TimestampField(source="created_at")
    updatedAt = TimestampField(source="updated_at")


class RunnerOut(RecordSerializer):
    """A runner, with what it registered with."""

    extra_keys_from = "attributes"

    id = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    registeredAt = TimestampField(source="registered_at")
    heartbeatAt = TimestampField(source="heartbeat_at")


class RunnerJobOut(RecordSerializer):
    id = serializers.CharField(max_length=IDENTIFIER_MAX_LENGTH)
    runId = serializers.CharField(source="run_id", max_length=64)
    commandId = serializers.CharField(source="command_id", max_length=64)
    idempotencyKey = serializers.CharField(source="idempotency_key", allow_null=True, max_length=IDENTIFIER_MAX_LENGTH)
    payloadHash = serializers.CharField(source="payload_hash", max_length=IDENTIFIER_MAX_LENGTH)
    attemptId = serializers.CharField(source="attempt_id", max_length=IDENTIFIER_MAX_LENGTH)
    runnerId = serializers.CharField(source="runner_id", max_length=IDENTIFIER_MAX_LENGTH)
    namespace = serializers.CharField(max_length=253)
    jobName = serializers.CharField(source="job_name", max_length=253)
    managerUrl = serializers.CharField(source="manager_url", max_length=2000)
    image = serializers.CharField(max_length=1000)
    sourceCommit = serializers.CharField(source="source_commit", max_length=IDENTIFIER_MAX_LENGTH)
    serviceAccountName = serializers.CharField(source="service_account_name", allow_null=True, max_length=253)
    result = serializers.JSONField()
    createdAt = TimestampField(source="created_at")
    updatedAt = TimestampField(source="updated_at")


# --- pages (`agentrun.wire.page` records) ---------------------------------------------------


def _seq_cursor() -> serializers.CharField:
    return serializers.CharField(
        max_length=CURSOR_MAX_LENGTH, help_text="The last item's seq; on an empty page, the afterSeq given (else 0)."
    )


class EventPageOut(RecordSerializer):
    items = EventOut(many=True)
    count = serializers.IntegerField(min_value=0)
    cursor = _seq_cursor()


class CommandPageOut(RecordSerializer):
    items = CommandOut(many=True)
    count = serializers.IntegerField(min_value=0)
    cursor = _seq_cursor()


class RunnerJobPageOut(RecordSerializer):
    items = RunnerJobOut(many=True)
    count = serializers.IntegerField(min_value=0)
    cursor = serializers.CharField(allow_null=True, max_length=CURSOR_MAX_LENGTH, help_text="Always null: one page.")


class SessionEventPageOut(RecordSerializer):
    """A session's events: those of `runId` when given, else of its active run, else of its last."""

    sessionId = serializers.CharField(max_length=SESSION_ID_MAX_LENGTH)
    runId = serializers.CharField(allow_null=True, max_length=64, help_text="Null when the session has no run yet.")
    items = EventOut(many=True)
    count = serializers.IntegerField(min_value=0)
    cursor = _seq_cursor()


# --- queries --------------------------------------------------------------------------------

MAX_EVENTS_PAGE = 500
MAX_COMMANDS_PAGE = 100
DEFAULT_PAGE = 100


def _after_seq() -> QueryCursor:
    return QueryCursor(source="after_seq", default=0, help_text="Only items with a greater seq (default 0).")


def _page_limit(maximum: int) -> QueryInteger:
    return QueryInteger(
        minimum=1, clamp=maximum, default=DEFAULT_PAGE, help_text=f"Page size; larger values are taken as {maximum}."
    )


def _wait() -> QueryWait:
    return QueryWait(
        help_text="Seconds to wait for a first item when there is none yet (long-poll); larger values are taken "
        f"as {MAX_WAIT_SECONDS}."
    )


class EventPageQuery(serializers.Serializer):
    """A seq page: items after `afterSeq`, at most `limit`, long-polled for `wait` seconds."""

    afterSeq = _after_seq()
    limit = _page_limit(MAX_EVENTS_PAGE)
    wait = _wait()


class CommandPageQuery(serializers.Serializer):
    afterSeq = _after_seq()
    limit = _page_limit(MAX_COMMANDS_PAGE)
    wait = _wait()


class _SessionRunQuery(serializers.Serializer):
    runId = QueryIdentifier(
        source="run_id", help_text="One of the session's runs (default: its active run, else its last)."
    )


class SessionEventQuery(_SessionRunQuery, EventPageQuery):
    """A session's events: `runId` first, then the page."""


STREAM_VIEWS = ("trace", "output", "control")
StreamViewParameter = documented_enum(QueryText, STREAM_VIEWS, keep_order=True)


class RunStreamQuery(serializers.Serializer):
    """A run's SSE stream: from `afterSeq` (a `Last-Event-ID` header wins: it is a reconnect)."""

    afterSeq = QueryCursor(
        source="after_seq", default=0, help_text="Only events with a greater seq (default 0); `Last-Event-ID` wins."
    )
    view = StreamViewParameter(
        default="trace",
        help_text="`trace`: every event (default); `output`: the output events, as a session's output shows; "
        "`control`: what a runner acts on (`terminal_status`, and the server's `backend_status` notes "
        "`command-created`, `command-terminal` and `cancel-requested`).",
    )


class SessionStreamQuery(_SessionRunQuery):
    """A session's output stream: from `runId` (default: its active run, else its last) after
    `afterSeq`; a `Last-Event-ID` header (`runId:seq`) wins."""

    afterSeq = QueryCursor(source="after_seq", default=0, help_text="Only events of `runId` with a greater seq.")


class RunnerJobQuery(serializers.Serializer):
    commandId = QueryIdentifier(source="command_id", help_text="Only this command's jobs.")
