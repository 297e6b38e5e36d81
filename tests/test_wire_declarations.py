"""The wire is declared once: each output serializer's fields are both the OpenAPI schema and the
record on the wire (agentrun.wire.RecordSerializer writes its encoder from them).

For real records of every output serializer (nulls and values in every nullable field, extra keys
present and absent, nested records and pages), the encoder's record has exactly the declared
fields, in order, equals what DRF's own field-by-field rendering makes of the same declarations,
and validates against the serializer's component in the generated schema, every timestamp with
milliseconds and `Z`.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
from drf_spectacular.generators import SchemaGenerator
from jsonschema import Draft202012Validator, FormatChecker
from rest_framework import serializers

import queues.serializers
import runs.serializers
import sessions.serializers
from agentrun.auth import Scope
from agentrun.wire import RecordSerializer, iso, iso_text, page
from queues import selectors as queue_selectors
from queues import services as queue_services
from runs import selectors as run_selectors
from runs import services as run_services
from sessions import selectors as session_selectors
from sessions import services as session_services
from tests.helpers.data import PROJECT, TENANT, claim, make_run, make_task

pytestmark = pytest.mark.django_db

SCOPE = Scope(tenant_id=TENANT, project_id=PROJECT)
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
MODULES = (runs.serializers, sessions.serializers, queues.serializers)
# Computed fields that are null without a reader (or without its cursor).
COMPUTED_NULLABLE = {"readerId", "readCursor"}
# Nullable fields the services never leave null, or never set.
NULL_ONE_WAY = {
    ("SessionOut", "lastActivityAt"): "every service that makes a session stamps its activity",
    ("RunnerJobPageOut", "cursor"): "one page: always null",
}


def record_serializers() -> set[type[RecordSerializer]]:
    found, pending = set(), list(RecordSerializer.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if any(cls.__module__ == module.__name__ for module in MODULES):
            found.add(cls)
    return found


# --- what the schema says ------------------------------------------------------------------------


def _json_schema(node):
    """OpenAPI 3.0 to JSON Schema: `nullable` becomes a null alternative."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _json_schema(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="module")
def components():
    schema = SchemaGenerator().get_schema(request=None, public=True)
    return _json_schema(schema["components"]["schemas"])


format_checker = FormatChecker()


@format_checker.checks("date-time")
def _milliseconds_and_z(value) -> bool:
    return not isinstance(value, str) or bool(TIMESTAMP.match(value))


def schema_errors(components, name: str, record) -> list[str]:
    validator = Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": {"schemas": components}}, format_checker=format_checker
    )
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(record)]


# --- real records ---------------------------------------------------------------------------------


def drf_rendering(serializer, instance, monkeypatch) -> dict:
    """The record as DRF's own `Serializer.to_representation` makes it, field by field, nested
    records included (plus the extra keys a record carries under its declared ones)."""
    with monkeypatch.context() as patch:
        patch.setattr(RecordSerializer, "to_representation", serializers.Serializer.to_representation)
        record = dict(serializer.to_representation(instance))
    extra = getattr(instance, serializer.extra_keys_from, None) if serializer.extra_keys_from else None
    return {**extra, **record} if extra else record


BUNDLE = {"kind": "git", "repoUrl": "https://example.com/r.git", "bundles": [{"subpath": "a", "targetPath": "b"}]}


def build_records():
    """(serializer class, instance, context) for every output serializer, from the services and
    selectors the views call."""
    records = []

    def add(cls, instance, **context):
        records.append((cls, instance, context))

    R, S, Q = runs.serializers, sessions.serializers, queues.serializers
    # Runs: every optional field null, then every one set, then claimed, then ended.
    bare = make_run()
    full = make_run(
        session_id="s-full",
        resource_bundle_ref=BUNDLE,
        provider_id="provider-1",
        workspace_ref={"repo": "r"},
        execution_policy={"maxAttempts": 2},
        metadata={"k": "v"},
        extra={"label": "x"},
        idempotency_key="key-1",
        webhook_url="https://hooks.example.com/run",
    )
    lease = claim(full)
    ended = run_services.run_finish(
        run_id=bare.id,
        runner_id=claim(bare).claimed_by,
        lease_epoch=1,
        terminal_status="failed",
        failure_kind="backend-failed",
        failure_message="it broke",
    )
    for run in (bare, run_selectors.run_get(run_id=full.id), lease, ended):
        add(R.RunOut, run)
    # Commands and events: fresh, acknowledged, finished; events as appended and as listed.
    command, _ = run_services.command_create(
        run_id=full.id, command_type="turn", payload={"prompt": "hi"}, idempotency_key="c-1"
    )
    add(R.CommandOut, command)
    run_services.command_ack(command_id=command.id, runner_id=lease.claimed_by, lease_epoch=lease.lease_epoch)
    appended, _ = run_services.event_append(
        run_id=full.id,
        runner_id=lease.claimed_by,
        lease_epoch=lease.lease_epoch,
        events=[("assistant_message", {"text": "x"}), ("command_output", {})],
    )
    finished = run_services.command_finish(
        command_id=command.id,
        runner_id=lease.claimed_by,
        lease_epoch=lease.lease_epoch,
        terminal_status="failed",
        failure_kind="backend-failed",
        failure_message="no",
        thread_id="thread-1",
        turn_id="turn-1",
    )
    add(R.CommandOut, finished)
    unkeyed, _ = run_services.command_create(run_id=full.id, command_type="turn", payload={})
    add(R.CommandOut, unkeyed)
    # A session whose run is working on a command.
    working = make_run(session_id="s-active")
    working_lease = claim(working)
    turn, _ = run_services.command_create(run_id=working.id, command_type="turn", payload={"prompt": "go"})
    run_services.command_ack(command_id=turn.id, runner_id=working_lease.claimed_by, lease_epoch=1)
    # And one whose turn failed.
    ended_lease = claim(make_run(session_id="s-ended"))
    failed_turn, _ = run_services.command_create(run_id=ended_lease.id, command_type="turn", payload={})
    run_services.command_ack(command_id=failed_turn.id, runner_id=ended_lease.claimed_by, lease_epoch=1)
    run_services.command_finish(
        command_id=failed_turn.id,
        runner_id=ended_lease.claimed_by,
        lease_epoch=1,
        terminal_status="failed",
        failure_kind="backend-failed",
    )
    events = run_selectors.event_list(run_id=full.id, after_seq=0, limit=500)
    commands = run_selectors.command_list(run_id=full.id, after_seq=0, limit=100)
    for event in [*appended, *events]:
        add(R.EventOut, event)
    add(R.EventPageOut, page(events, cursor=str(events[-1].seq)))
    add(R.EventPageOut, page([], cursor="0"))
    add(R.CommandPageOut, page(commands, cursor=str(commands[-1].seq)))
    add(R.SessionEventPageOut, page(events, cursor="1", sessionId="s-full", runId=full.id))
    add(R.SessionEventPageOut, page([], cursor="0", sessionId="s-empty", runId=None))
    # Runners and their jobs.
    runner, _ = run_services.runner_register(tenant_id=TENANT, runner_id=None, attributes={"host": "h1"})
    add(R.RunnerOut, runner)
    bare_runner, _ = run_services.runner_register(tenant_id=TENANT, runner_id="runner-bare", attributes={})
    add(R.RunnerOut, bare_runner)
    job_fields = {
        "command_id": command.id,
        "payload_hash": "h",
        "attempt_id": "a",
        "runner_id": "r",
        "namespace": "ns",
        "job_name": "job",
        "manager_url": "http://manager",
        "image": "image:1",
        "source_commit": "abc",
        "result": {},
    }
    job, _ = run_services.runner_job_save(run_id=full.id, fields={**job_fields, "service_account_name": None})
    named, _ = run_services.runner_job_save(
        run_id=full.id, fields={**job_fields, "service_account_name": "sa"}, idempotency_key="job-2"
    )
    add(R.RunnerJobOut, job)
    add(R.RunnerJobOut, named)
    add(R.RunnerJobPageOut, page([job, named], cursor=None))
    # Sessions: one bare, one with a run and every field set, through the listing and one by one,
    # for no reader, a reader who read and a reader who did not.
    session_services.session_upsert(session_id="s-bare", tenant_id=TENANT, project_id=PROJECT, backend_profile="echo")
    session_services.session_upsert(
        session_id="s-full",
        tenant_id=TENANT,
        project_id=PROJECT,
        backend_profile="echo",
        conversation_id="conv",
        thread_id="thread",
        metadata={"k": "v"},
        expires_at=lease.created_at,
        codex_rollout_subdir="rollouts",
    )
    session_services.session_storage_refresh(
        session_id="s-full",
        storage_kind="pvc",
        pvc_name="pvc-1",
        namespace="ns",
        pvc_phase="Bound",
        size_bytes=10,
        files_count=2,
        sha256="0" * 64,
        scope=SCOPE,
    )
    session_services.session_storage_refresh(session_id="s-bare", storage_kind="pvc", pvc_name="pvc-2", scope=SCOPE)
    session_services.session_storage_evict(session_id="s-bare", pvc_name="pvc-2", scope=SCOPE)
    add(S.ReadCursorOut, session_services.session_mark_read(session_id="s-bare", reader_id="ana", scope=SCOPE))
    for reader in (None, "ana", "bob"):
        found = session_selectors.session_list(scope=SCOPE, state="all", reader_id=reader, limit=50)
        filters = {
            "state": "all",
            "backend_profile": None,
            "reader_id": reader,
            "cursor_text": None,
            "limit": 50,
        }
        add(S.SessionListFiltersOut, filters)
        add(
            S.SessionListOut,
            page(found.sessions, cursor=found.cursor, nextPageToken=found.next_page_token, filters=filters),
            reader_id=reader,
        )
        for session in found.sessions:
            add(S.SessionOut, session, reader_id=reader)
        for session_id in ("s-bare", "s-full"):
            one = session_selectors.session_with_cursor(session_id=session_id, reader_id=reader, scope=SCOPE)
            add(S.SessionOut, one, reader_id=reader)
    none = session_selectors.session_list(scope=SCOPE, state="all", backend_profile="codex", limit=50)
    filters = {"state": "all", "backend_profile": "codex", "reader_id": None, "cursor_text": None, "limit": 50}
    add(S.SessionListOut, page(none.sessions, cursor=none.cursor, nextPageToken=none.next_page_token, filters=filters))
    feed = session_selectors.session_list(scope=SCOPE, state="all", cursor=0, limit=1)
    filters = {"state": "all", "backend_profile": "echo", "reader_id": None, "cursor_text": "0", "limit": 1}
    add(S.SessionListOut, page(feed.sessions, cursor=feed.cursor, nextPageToken="token", filters=filters))
    add(S.SessionListFiltersOut, filters)
    # Queue tasks: pending, dispatched (an attempt), cancelled, one with every field set.
    pending = make_task(priority=1, payload=None)
    full_task = make_task(
        priority=5,
        provider_id="provider-1",
        workspace_ref={"repo": "r"},
        session_ref={"sessionId": "s-task"},
        execution_policy={"maxAttempts": 1},
        resource_bundle_ref=BUNDLE,
        references=[{"url": "u"}],
        metadata={"k": "v"},
        key="task-1",
        webhook_url="https://hooks.example.com/task",
    )
    queue_services.dispatch_one()
    dispatched = queue_selectors.task_get(task_id=full_task.id, scope=SCOPE)
    assert dispatched.latest_attempt is not None
    cancelled = queue_services.task_cancel(task_id=full_task.id, reason="enough", scope=SCOPE)
    add(Q.TaskReadCursorOut, queue_services.task_mark_read(task_id=pending.id, reader_id="ana", scope=SCOPE))
    for task in (pending, dispatched, cancelled, queue_selectors.task_get(task_id=pending.id, scope=SCOPE)):
        add(Q.TaskOut, task)
    tasks = queue_selectors.task_list(scope=SCOPE, limit=1)
    add(Q.TaskListOut, page(tasks.tasks, cursor=tasks.cursor, nextPageToken=tasks.next_page_token))
    add(Q.TaskListOut, page([], cursor=None, nextPageToken=None))
    add(Q.StatsOut, queue_selectors.task_stats(scope=SCOPE))
    add(Q.StatsOut, queue_selectors.task_stats(scope=SCOPE, queue="none"))
    make_task(priority=9)  # unread for ana, active for nobody
    for reader, queue in ((None, None), ("ana", "default"), ("bob", None)):
        snapshot = queue_selectors.commander(scope=SCOPE, queue=queue, reader_id=reader)
        add(Q.CommanderOut, snapshot, reader_id=reader)
        for task in snapshot["items"]:
            add(Q.TaskSummaryOut, task, reader_id=reader)
    return records


@pytest.fixture
def records():
    return build_records()


def declared(cls) -> list[str]:
    return [name for name, field in cls().fields.items() if not field.write_only]


def test_every_output_serializer_renders_its_declared_fields_as_drf_does_and_as_the_schema_says(
    records, components, monkeypatch
):
    assert {cls for cls, _, _ in records} == record_serializers(), "an output serializer without records here"
    for cls, instance, context in records:
        serializer = cls(context=context)
        record = serializer.to_representation(instance)
        where = f"{cls.__name__} of {instance!r:.80}"
        names = declared(cls)
        extra = list(getattr(instance, cls.extra_keys_from) or {}) if cls.extra_keys_from else []
        assert set(record) == set(names) | set(extra), where
        assert [name for name in record if name in names] == names, where  # declaration order
        assert record == drf_rendering(serializer, instance, monkeypatch), where
        assert schema_errors(components, cls.__name__, record) == [], where


def test_every_nullable_field_is_seen_null_and_set(records):
    """The records above are a table worth checking against: each nullable field of each output
    serializer is null in one record and set in another."""
    seen = defaultdict(set)
    for cls, instance, context in records:
        record = cls(context=context).to_representation(instance)
        for name in declared(cls):
            seen[cls, name].add(record[name] is None)
    unseen = []
    for cls in record_serializers():
        for name, field in cls().fields.items():
            computed = isinstance(field, serializers.SerializerMethodField)
            nullable = field.allow_null or (computed and name in COMPUTED_NULLABLE)
            expected = {True, False} if nullable else {False}
            if (cls.__name__, name) not in NULL_ONE_WAY and seen[cls, name] != expected:
                unseen.append(f"{cls.__name__}.{name}: null {sorted(seen[cls, name])}, expected {sorted(expected)}")
    assert unseen == [], "\n".join(unseen)


def test_a_queue_attempts_start_is_sent_with_milliseconds(records):
    """The dispatcher stores `startedAt` in the task's JSON as the wire writes it, and the wire
    sends milliseconds even for a row stored with microseconds (before the dispatcher wrote them
    so)."""
    tasks = [task for cls, task, _ in records if cls is queues.serializers.TaskOut and task.latest_attempt]
    assert tasks
    for task in tasks:
        assert TIMESTAMP.match(task.latest_attempt["startedAt"]), task.latest_attempt
        assert TIMESTAMP.match(queues.serializers.TaskOut().to_representation(task)["latestAttempt"]["startedAt"])
        task.latest_attempt = {**task.latest_attempt, "startedAt": "2026-12-02T10:00:00.123456+00:00"}
        sent = queues.serializers.TaskOut().to_representation(task)["latestAttempt"]["startedAt"]
        assert sent == "2026-12-02T10:00:00.123Z"


def test_iso_writes_utc_milliseconds_and_z():
    from datetime import UTC, datetime, timedelta, timezone

    assert iso(None) is None
    assert iso(datetime(2026, 1, 2, 3, 4, 5, 678999, tzinfo=UTC)) == "2026-01-02T03:04:05.678Z"
    assert iso(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))) == "2026-01-02T01:04:05.000Z"
    assert iso(datetime(1, 1, 1, tzinfo=UTC)) == "0001-01-01T00:00:00.000Z"
    assert iso_text("2026-01-02T03:04:05.678999Z") == "2026-01-02T03:04:05.678Z"
    assert iso_text("2026-01-02T05:04:05+02:00") == "2026-01-02T03:04:05.000Z"
    assert iso_text("not a time") == "not a time"
    assert iso_text("0001-01-01T00:00:00+05:00") == "0001-01-01T00:00:00+05:00"  # out of range in UTC


def test_a_record_field_must_read_one_attribute():
    class Dotted(RecordSerializer):
        name = serializers.CharField(source="a.b")

    with pytest.raises(TypeError, match="reads one attribute"):
        Dotted().to_representation({"a": {"b": "x"}})
