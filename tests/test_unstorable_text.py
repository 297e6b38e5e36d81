"""Text PostgreSQL cannot store, on every route that stores JSON or text (API.md, "Limits and bad
input"): free content is stored with U+FFFD, event payloads list it in `sanitizedPaths`,
identifiers are 400 naming the field, and nothing is ever a 500. Each property test generates
JSON with NULs, unpaired surrogates, odd keys and long strings, sends it as a client would
(JSON with \\u escapes), and compares the row in the table with what the rule says it must be."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from agentrun.redaction import is_secret_key
from queues.models import QueueTask
from runs import services
from runs.models import Command, Run, RunEvent, Runner, RunnerJob
from sessions.models import Session
from tests.helpers import PROJECT, TENANT, assert_error, make_key

pytestmark = pytest.mark.django_db

BAD = ["\x00", "\ud800", "\udbff", "\udc00", "\udfff"]
_chars = st.one_of(st.characters(codec="utf-8"), st.sampled_from(BAD))
# Long strings are built by repeating a short one: generating thousands of characters one by
# one costs more than the requests.
texts = st.text(_chars, max_size=40) | st.builds(
    lambda part, times: part * times, st.text(_chars, min_size=1, max_size=8), st.integers(300, 900)
)
keys = st.text(_chars, max_size=12).filter(lambda key: not is_secret_key(key))
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    scalars | texts, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4), max_leaves=24
)
json_objects = st.dictionaries(keys, json_values, max_size=5)
# A fixed seed and no shrinking: the same examples on every run, within the suite's time. Run
# with --hypothesis-seed and without these to explore.
PROPERTY = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_numbers = itertools.count()


def fresh(prefix: str) -> str:
    return f"{prefix}-{next(_numbers)}"


def clean_text(text: str) -> str:
    """The rule, written out independently of the server's code: one U+FFFD for each U+0000
    and each unpaired surrogate."""
    return "".join("\ufffd" if ch == "\x00" or "\ud800" <= ch <= "\udfff" else ch for ch in text)


def cleaned(value):
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [cleaned(item) for item in value]
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            result[clean_text(key)] = cleaned(item)  # keys that become equal: the last wins
        return result
    return value


def sanitized_pointers(value, path="") -> set[str]:
    found = set()
    if isinstance(value, dict):
        merged = {}
        for key, item in value.items():
            merged[clean_text(key)] = (key, item)
        for new_key, (key, item) in merged.items():
            pointer = path + "/" + new_key.replace("~", "~0").replace("/", "~1")
            if clean_text(key) != key or (isinstance(item, str) and clean_text(item) != item):
                found.add(pointer)
            found |= sanitized_pointers(item, pointer)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            pointer = f"{path}/{index}"
            if isinstance(item, str) and clean_text(item) != item:
                found.add(pointer)
            found |= sanitized_pointers(item, pointer)
    return found


def send(api, method: str, path: str, body) -> tuple[int, dict | None]:
    # json.dumps writes U+0000 and surrogates as \u escapes, as every JSON encoder must.
    return api.raw(method, path, json.dumps(body).encode())


def _numbers_as_floats(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [_numbers_as_floats(item) for item in value]
    return {key: _numbers_as_floats(item) for key, item in value.items()}


def same_json(stored, expected) -> bool:
    """Equal as JSON. jsonb keeps a number as the decimal it was sent as (4.2e16 comes back as
    the integer 42000000000000000), so numbers are compared as floats."""
    return _numbers_as_floats(stored) == _numbers_as_floats(expected)


@pytest.fixture
def held_run(db):
    run = services.run_create(tenant_id=TENANT, project_id=PROJECT, backend_profile="echo")[0]
    services.run_claim(run_id=run.id, runner_id="runner-1", lease_ms=600_000)
    return run


# --- free content ------------------------------------------------------------------------------


@PROPERTY
@given(metadata=json_objects, workspace=json_values, extra=json_values, session_metadata=json_objects)
def test_run_create_stores_free_content_cleaned(client_api, metadata, workspace, extra, session_metadata):
    session_id = fresh("s")
    body = {
        "backendProfile": "echo",
        "metadata": metadata,
        "workspaceRef": workspace,
        "custom": extra,
        "sessionRef": {"sessionId": session_id, "metadata": session_metadata},
    }
    status, record = send(client_api, "post", "runs", body)
    assert status == 201, record
    run = Run.objects.get(pk=record["id"])
    assert same_json(run.metadata, cleaned(metadata))
    assert same_json(run.workspace_ref, cleaned(workspace))
    assert same_json(run.extra["custom"], cleaned(extra))
    assert same_json(Session.objects.get(pk=session_id).metadata, cleaned(session_metadata))
    assert same_json(record["metadata"], cleaned(metadata))


@PROPERTY
@given(payload=json_objects)
def test_event_payloads_are_cleaned_and_list_sanitized_paths(runner_api, held_run, payload):
    status, event = send(
        runner_api,
        "post",
        f"runs/{held_run.id}/events",
        {"runnerId": "runner-1", "leaseEpoch": 1, "type": "command_output", "payload": payload},
    )
    assert status == 201, event
    stored = RunEvent.objects.get(pk=event["id"]).payload
    expected = cleaned(payload)
    pointers = sanitized_pointers(payload)
    if pointers:
        expected["sanitizedPaths"] = sorted(pointers)
    assert same_json(stored, expected)
    assert same_json(event["payload"], expected)


@PROPERTY
@given(payloads=st.lists(json_objects, min_size=1, max_size=5))
def test_batches_are_cleaned_and_replay_identically(runner_api, held_run, payloads):
    body = {
        "runnerId": "runner-1",
        "leaseEpoch": 1,
        "batchKey": fresh("b"),
        "events": [{"type": "command_output", "payload": payload} for payload in payloads],
    }
    status, first = send(runner_api, "post", f"runs/{held_run.id}/events", body)
    assert status == 201, first
    status, again = send(runner_api, "post", f"runs/{held_run.id}/events", body)
    assert status == 200 and same_json(again["items"], first["items"])
    stored = list(RunEvent.objects.filter(pk__in=[item["id"] for item in first["items"]]).order_by("seq"))
    assert [event.payload.get("sanitizedPaths", []) for event in stored] == [
        sorted(sanitized_pointers(payload)) for payload in payloads
    ]


@PROPERTY
@given(payload=json_objects, prompt=texts)
def test_command_payloads_are_cleaned(client_api, held_run, payload, prompt):
    payload = {**payload, "prompt": prompt}
    status, command = send(client_api, "post", f"runs/{held_run.id}/commands", {"type": "turn", "payload": payload})
    assert status == 201, command
    assert same_json(Command.objects.get(pk=command["id"]).payload, cleaned(payload))


@PROPERTY
@given(metadata=json_objects, title=texts)
def test_session_put_metadata_and_title_are_cleaned(client_api, metadata, title):
    session_id = fresh("put")
    metadata = {**metadata, "title": title}
    status, body = send(client_api, "put", f"sessions/{session_id}", {"backendProfile": "echo", "metadata": metadata})
    assert status == 201, body
    session = Session.objects.get(pk=session_id)
    assert same_json(session.metadata, cleaned(metadata))
    assert session.title == (clean_text(title).strip()[:200] or None)


@PROPERTY
@given(payload=json_objects, metadata=json_objects, references=json_values, title=texts)
def test_queue_tasks_store_free_content_cleaned(client_api, payload, metadata, references, title):
    body = {
        "queue": "q",
        "backendProfile": "echo",
        "payload": payload,
        "metadata": metadata,
        "references": references,
        "title": title[:500],
        "idempotencyKey": fresh("k"),
    }
    status, task = send(client_api, "post", "queue-tasks", body)
    assert status == 201, task
    row = QueueTask.objects.get(pk=task["id"])
    assert same_json(row.payload, cleaned(payload))
    assert same_json(row.metadata, cleaned(metadata))
    assert same_json(row.references, cleaned(references))
    assert row.title == clean_text(title[:500])
    # The same body again is a replay of the same task: the hash is over what was stored.
    status, again = send(client_api, "post", "queue-tasks", body)
    assert status == 200 and again["id"] == task["id"]


@PROPERTY
@given(attributes=json_objects, result=json_objects)
def test_runner_attributes_and_job_results_are_cleaned(runner_api, held_run, attributes, result):
    runner_id = fresh("runner")
    status, runner = send(runner_api, "post", "runners", {**attributes, "runnerId": runner_id})
    assert status == 201, runner
    expected = {
        key: value
        for key, value in cleaned(attributes).items()
        if key not in {"id", "runnerId", "registeredAt", "heartbeatAt", "tenantId"}
    }
    assert same_json(Runner.objects.get(pk=runner_id).attributes, expected)
    job = {
        "commandId": "cmd-1",
        "payloadHash": "h",
        "attemptId": "a",
        "runnerId": runner_id,
        "namespace": "ns",
        "jobName": fresh("job"),
        "managerUrl": "http://m",
        "image": "img",
        "sourceCommit": "c",
        "result": result,
    }
    status, record = send(runner_api, "post", f"runs/{held_run.id}/runner-jobs", job)
    assert status == 201, record
    assert same_json(RunnerJob.objects.get(pk=record["id"]).result, cleaned(result))


@PROPERTY
@given(message=texts, reason=texts)
def test_messages_and_reasons_are_cleaned(client_api, runner_api, message, reason):
    run = services.run_create(tenant_id=TENANT, project_id=PROJECT, backend_profile="echo")[0]
    services.run_claim(run_id=run.id, runner_id="runner-1", lease_ms=600_000)
    command = services.command_create(run_id=run.id, command_type="turn", payload={})[0]
    status, body = send(client_api, "post", f"commands/{command.id}/cancel", {"reason": reason[:2000]})
    assert status == 200, body
    assert Command.objects.get(pk=command.id).failure_message == (clean_text(reason[:2000]) or "cancel requested")
    status, body = send(
        runner_api,
        "post",
        f"runs/{run.id}/finish",
        {
            "runnerId": "runner-1",
            "leaseEpoch": 1,
            "terminalStatus": "failed",
            "failureKind": "agent-failed",
            "failureMessage": message[:10_000],
        },
    )
    assert status == 200, body
    assert Run.objects.get(pk=run.id).failure_message == clean_text(message[:10_000])
    terminal = RunEvent.objects.get(run_id=run.id, type="terminal_status")
    # Server-emitted events carry exactly their own keys: no sanitizedPaths.
    assert set(terminal.payload) == {"terminalStatus", "failureKind", "message"}


def test_a_sanitized_key_and_a_secret_together(runner_api, held_run):
    payload = {"a\x00b": "x\ud800y", "apiToken": "t\x00", "log": "export T=ghp_" + "a" * 36 + "\x00"}
    status, event = send(
        runner_api,
        "post",
        f"runs/{held_run.id}/events",
        {"runnerId": "runner-1", "leaseEpoch": 1, "type": "command_output", "payload": payload},
    )
    assert status == 201, event
    stored = RunEvent.objects.get(pk=event["id"]).payload
    assert stored == {
        "a\ufffdb": "x\ufffdy",
        "apiToken": "[REDACTED]",
        "log": "export T=[REDACTED]\ufffd",
        "redactedPaths": ["/apiToken", "/log"],
        "sanitizedPaths": ["/a\ufffdb", "/log"],
    }


def test_services_called_directly_clean_raw_text_too(held_run):
    events, _ = services.event_append(
        run_id=held_run.id,
        runner_id="runner-1",
        lease_epoch=1,
        events=[("command_output", {"out\x00": ["a\x00", {"b": "\udcff"}]})],
    )
    assert RunEvent.objects.get(pk=events[0].id).payload == {
        "out\ufffd": ["a\ufffd", {"b": "\ufffd"}],
        "sanitizedPaths": ["/out\ufffd", "/out\ufffd/0", "/out\ufffd/1/b"],
    }


# --- identifiers --------------------------------------------------------------------------------


IDENTIFIER_CASES = [
    (
        "runs idempotencyKey",
        "client",
        lambda run, v: ("post", "runs", {"backendProfile": "echo", "idempotencyKey": v}),
        "idempotencyKey",
    ),
    ("runs tenantId", "client", lambda run, v: ("post", "runs", {"backendProfile": "echo", "tenantId": v}), "tenantId"),
    (
        "runs projectId",
        "client",
        lambda run, v: ("post", "runs", {"backendProfile": "echo", "projectId": v}),
        "projectId",
    ),
    ("runs backendProfile", "client", lambda run, v: ("post", "runs", {"backendProfile": v}), "backendProfile"),
    (
        "runs sessionId",
        "client",
        lambda run, v: ("post", "runs", {"backendProfile": "echo", "sessionRef": {"sessionId": v}}),
        "sessionRef.sessionId",
    ),
    ("claim runnerId", "runner", lambda run, v: ("post", f"runs/{run.id}/claim", {"runnerId": v}), "runnerId"),
    (
        "append runnerId",
        "runner",
        lambda run, v: ("post", f"runs/{run.id}/events", {"runnerId": v, "leaseEpoch": 1, "type": "usage"}),
        "runnerId",
    ),
    (
        "append batchKey",
        "runner",
        lambda run, v: (
            "post",
            f"runs/{run.id}/events",
            {"runnerId": "runner-1", "leaseEpoch": 1, "batchKey": v, "events": [{"type": "usage"}]},
        ),
        "batchKey",
    ),
    (
        "command idempotencyKey",
        "client",
        lambda run, v: ("post", f"runs/{run.id}/commands", {"type": "turn", "idempotencyKey": v}),
        "idempotencyKey",
    ),
    ("runners runnerId", "runner", lambda run, v: ("post", "runners", {"runnerId": v}), "runnerId"),
    (
        "put sessionId in body",
        "client",
        lambda run, v: ("put", "sessions/s1", {"backendProfile": "echo", "sessionId": v}),
        "sessionId",
    ),
    ("read readerId", "client", lambda run, v: ("post", "sessions/s1/read", {"readerId": v}), "readerId"),
    ("queue", "client", lambda run, v: ("post", "queue-tasks", {"queue": v, "backendProfile": "echo"}), "queue"),
    (
        "lane",
        "client",
        lambda run, v: ("post", "queue-tasks", {"queue": "q", "lane": v, "backendProfile": "echo"}),
        "lane",
    ),
    (
        "task idempotencyKey",
        "client",
        lambda run, v: ("post", "queue-tasks", {"queue": "q", "backendProfile": "echo", "idempotencyKey": v}),
        "idempotencyKey",
    ),
    (
        "storage pvcName",
        "runner",
        lambda run, v: ("post", "sessions/s1/storage", {"storageKind": "pvc", "pvcName": v}),
        "pvcName",
    ),
    ("evict pvcName", "runner", lambda run, v: ("post", "sessions/s1/storage/evict", {"pvcName": v}), "pvcName"),
]


def _counts():
    return (
        Run.objects.count(),
        RunEvent.objects.count(),
        Command.objects.count(),
        Session.objects.count(),
        QueueTask.objects.count(),
        Runner.objects.count(),
    )


@pytest.mark.parametrize("bad", ["a\x00b", "a\ud800", "\udfff"])
@pytest.mark.parametrize(("name", "role", "build", "field"), IDENTIFIER_CASES, ids=[c[0] for c in IDENTIFIER_CASES])
def test_an_identifier_with_unstorable_text_is_400_naming_it(held_run, name, role, build, field, bad):
    services.run_create(tenant_id=TENANT, project_id=PROJECT, backend_profile="echo", session_ref={"sessionId": "s1"})
    api = make_key(role)
    before = _counts()
    method, path, body = build(held_run, bad)
    status, answer = send(api, method, path, body)
    assert_error(status, answer, 400, "schema-invalid")
    assert field in json.dumps(answer["error"]["details"]), answer
    assert _counts() == before


@pytest.mark.parametrize(
    ("path", "parameter"),
    [
        ("sessions?readerId=a%00b", "readerId"),
        ("sessions?state=%00", "state"),
        ("sessions?cursor=1%00", "cursor"),
        ("queues/stats?queue=%00", "queue"),
        ("queues/commander?readerId=%00", "readerId"),
        ("queue-tasks?queue=%00", "queue"),
        ("sessions/s1?readerId=%00", "readerId"),
        ("runs/x/events?afterSeq=%00", "afterSeq"),
        ("sessions?x%00=1", "x\x00"),
    ],
)
def test_a_query_parameter_with_a_nul_is_400_naming_it(client_api, path, parameter):
    status, body = client_api.get(path)
    assert_error(status, body, 400, "schema-invalid")
    assert body["error"]["details"]["parameter"] == parameter


# --- shapes PostgreSQL or Python refuse ----------------------------------------------------------


def _nested(levels: int):
    """`levels` objects, one inside the other."""
    value: object = "leaf\x00"
    for _ in range(levels):
        value = {"k": value}
    return value


def test_nesting_up_to_64_levels_is_stored_and_deeper_is_400(runner_api, held_run):
    path = f"runs/{held_run.id}/events"
    body = {"runnerId": "runner-1", "leaseEpoch": 1, "type": "usage"}
    # The body is the first level, the payload's objects the other 63.
    status, event = send(runner_api, "post", path, {**body, "payload": _nested(63)})
    assert status == 201, event
    assert RunEvent.objects.get(pk=event["id"]).payload["sanitizedPaths"] == ["/k" * 63]
    before = RunEvent.objects.count()
    assert_error(*send(runner_api, "post", path, {**body, "payload": _nested(64)}), 400, "schema-invalid")
    deep = b'{"runnerId": "runner-1", "leaseEpoch": 1, "type": "usage", "payload": ' + b"[" * 100_000 + b"]" * 100_000
    assert_error(*runner_api.raw("post", path, deep + b"}"), 400, "schema-invalid")
    assert RunEvent.objects.count() == before


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999", b"1" * 5000])
def test_numbers_json_or_postgresql_cannot_hold_are_400(client_api, literal):
    body = b'{"backendProfile": "echo", "metadata": {"n": ' + literal + b"}}"
    assert_error(*client_api.raw("post", "runs", body), 400, "schema-invalid")
    assert not Run.objects.exists()


@pytest.mark.parametrize("body", [b'{"backendProfile": "echo", "x": "\xff"}', b'{"backendProfile": "ech\xc3"}'])
def test_a_body_that_is_not_utf8_is_400(client_api, body):
    assert_error(*client_api.raw("post", "runs", body), 400, "schema-invalid")
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("queue-tasks", {"queue": "q", "backendProfile": "echo", "priority": 10**30}),
        (
            "runs",
            {"backendProfile": "echo", "sessionRef": {"sessionId": "s", "expiresAt": "0001-01-01T00:00:00+05:00"}},
        ),
        ("runs", {"backendProfile": "echo", "executionPolicy": {"maxAttempts": 10**30}}),
    ],
)
def test_numbers_and_dates_out_of_range_are_400(client_api, path, body):
    before = _counts()
    assert_error(*send(client_api, "post", path, body), 400, "schema-invalid")
    assert _counts() == before


@PROPERTY
@given(latest=json_objects, reason=texts)
def test_queue_task_attempts_and_cancels_store_cleaned_text(operator_api, latest, reason):
    task = send(operator_api, "post", "queue-tasks", {"queue": "q", "backendProfile": "echo"})[1]
    status, body = send(
        operator_api, "post", f"queue-tasks/{task['id']}/attempt", {"state": "running", "latestAttempt": latest}
    )
    assert status == 200, body
    assert same_json(QueueTask.objects.get(pk=task["id"]).latest_attempt, cleaned(latest))
    status, body = send(operator_api, "post", f"queue-tasks/{task['id']}/cancel", {"reason": reason[:2000]})
    assert status == 200, body
    assert QueueTask.objects.get(pk=task["id"]).cancel_reason == (clean_text(reason[:2000]) or "cancel requested")
