"""The sessions API: wire shapes, statuses, roles, scope and bad input."""

from __future__ import annotations

import pytest

from runs import services as run_services
from sessions.models import Session
from tests.helpers import PROJECT, TENANT, assert_error, claim, make_key, make_run

pytestmark = pytest.mark.django_db

SUMMARY_KEYS = [
    "sessionId",
    "tenantId",
    "projectId",
    "backendProfile",
    "conversationId",
    "threadId",
    "metadata",
    "version",
    "executionState",
    "lastRunId",
    "lastCommandId",
    "activeRunId",
    "activeCommandId",
    "lastEventSeq",
    "terminalStatus",
    "failureKind",
    "title",
    "summary",
    "lastActivityAt",
    "createdAt",
    "updatedAt",
    "expiresAt",
    "storageKind",
    "storagePvcName",
    "storageNamespace",
    "storagePvcPhase",
    "storageSizeBytes",
    "storageFilesCount",
    "storageSha256",
    "storageUpdatedAt",
    "storageEvictedAt",
    "codexRolloutSubdir",
    "sessionPath",
    "readerId",
    "readCursor",
    "attentionState",
    "unread",
    "active",
]


def put(api, session_id, **body):
    body.setdefault("backendProfile", "echo")
    return api.put(f"sessions/{session_id}", body)


def test_put_creates_then_updates(client_api):
    status, body = put(client_api, "s1", metadata={"title": "Hello"}, expiresAt="2030-01-01T00:00:00Z")
    assert status == 201
    assert list(body) == SUMMARY_KEYS
    assert body["sessionPath"] == f"{TENANT}/{PROJECT}/s1"
    assert body["title"] == "Hello" and body["expiresAt"] == "2030-01-01T00:00:00.000Z"
    assert (body["tenantId"], body["projectId"], body["storageKind"]) == (TENANT, PROJECT, "none")
    assert (body["readerId"], body["readCursor"], body["attentionState"]) == (None, None, "unread")
    status, again = put(client_api, "s1", threadId="t1")
    assert status == 200 and again["threadId"] == "t1" and again["version"] > body["version"]
    assert again["metadata"] == {} and again["expiresAt"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"backendProfile": "gpt"}, "backendProfile"),
        ({"backendProfile": "echo", "metadata": []}, "metadata"),
        ({"backendProfile": "echo", "expiresAt": "tomorrow"}, "expiresAt"),
        ({"backendProfile": "echo", "sessionId": "other"}, "sessionId"),
        ({}, "backendProfile"),
    ],
)
def test_put_rejects_bad_bodies(client_api, body, field):
    status, error = client_api.put("sessions/s1", body)
    assert_error(status, error, 400, "schema-invalid")
    assert field in str(error)
    assert not Session.objects.filter(pk="s1").exists()


def test_put_across_tenant_project_or_backend_is_refused(client_api):
    put(make_key("client", tenant="t2"), "theirs")
    put(make_key("client", project="p2"), "other-project")
    assert_error(*put(client_api, "theirs"), 403, "tenant-policy-denied")
    assert_error(*put(client_api, "other-project"), 403, "tenant-policy-denied")
    put(client_api, "mine")
    status, body = put(client_api, "mine", backendProfile="codex")
    assert_error(status, body, 400, "schema-invalid")
    assert body["error"]["details"]["existingBackendProfile"] == "echo"
    assert_error(
        *client_api.put("sessions/x", {"backendProfile": "echo", "tenantId": "t2"}), 403, "tenant-policy-denied"
    )


def test_get_summary_with_and_without_a_reader(client_api):
    put(client_api, "s1")
    status, body = client_api.get("sessions/s1", readerId="ana")
    assert status == 200 and body["readerId"] == "ana" and body["readCursor"] is None and body["unread"]
    status, cursor = client_api.post("sessions/s1/read", {"readerId": "ana"})
    assert status == 200
    assert list(cursor) == ["sessionId", "readerId", "sessionVersion", "readAt"]
    assert cursor["sessionVersion"] == body["version"]
    _, body = client_api.get("sessions/s1", readerId="ana")
    assert body["readCursor"] == cursor and body["attentionState"] == "read" and not body["unread"]
    _, body = client_api.get("sessions/s1")
    assert body["readCursor"] is None and body["unread"]


def test_unknown_and_foreign_sessions_are_not_found(client_api):
    put(make_key("client", tenant="t2"), "theirs")
    put(make_key("client", project="p2"), "other-project")
    for session_id in ("missing", "theirs", "other-project"):
        assert_error(*client_api.get(f"sessions/{session_id}"), 404, "schema-invalid")
        assert_error(*client_api.post(f"sessions/{session_id}/read", {"readerId": "a"}), 404, "schema-invalid")
        assert_error(*client_api.get(f"sessions/{session_id}/trace"), 404, "schema-invalid")


def test_read_needs_a_reader(client_api):
    put(client_api, "s1")
    assert_error(*client_api.post("sessions/s1/read", {}), 400, "schema-invalid")
    assert_error(*client_api.post("sessions/s1/read", {"readerId": 7}), 400, "schema-invalid")


# --- lists -----------------------------------------------------------------------------------------


def test_list_shape_and_filters(client_api):
    for name in ("a", "b"):
        put(client_api, name)
    status, body = client_api.get("sessions", readerId="ana", limit="1")
    assert status == 200
    assert list(body) == ["items", "count", "cursor", "nextPageToken", "filters"]
    assert body["count"] == 1 and list(body["items"][0]) == SUMMARY_KEYS
    assert body["filters"] == {
        "state": "default",
        "backendProfile": None,
        "readerId": "ana",
        "cursor": None,
        "limit": 1,
    }
    versions = sorted(Session.objects.values_list("version", flat=True))
    assert body["cursor"] == str(versions[-1])
    status, second = client_api.get("sessions", readerId="ana", limit="1", pageToken=body["nextPageToken"])
    assert status == 200 and second["nextPageToken"] is None
    assert {body["items"][0]["sessionId"], second["items"][0]["sessionId"]} == {"a", "b"}
    _, clamped = client_api.get("sessions", limit="1000")
    assert clamped["filters"]["limit"] == 100


def test_feed_with_cursor_or_updated_after(client_api):
    put(client_api, "a")
    put(client_api, "b")
    first = Session.objects.get(pk="a").version
    for name in ("cursor", "updatedAfter"):
        status, body = client_api.get("sessions", state="all", **{name: str(first)})
        assert status == 200 and [i["sessionId"] for i in body["items"]] == ["b"]
        assert body["cursor"] == str(Session.objects.get(pk="b").version) and body["nextPageToken"] is None
    _, empty = client_api.get("sessions", state="all", cursor=body["cursor"])
    assert empty["items"] == [] and empty["cursor"] == body["cursor"]
    assert empty["filters"]["cursor"] == body["cursor"]


@pytest.mark.parametrize(
    "params",
    [
        {"state": "sleeping"},
        {"limit": "0"},
        {"limit": "-1"},
        {"limit": "ten"},
        {"cursor": "1e3"},
        {"cursor": "-4"},
        {"updatedAfter": "0x10"},
        {"backendProfile": "gpt"},
        {"cursor": "1", "pageToken": "abc"},
        {"pageToken": "not-a-token"},
    ],
)
def test_list_rejects_bad_parameters(client_api, params):
    assert_error(*client_api.get("sessions", **params), 400, "schema-invalid")


def test_list_sees_only_the_key_scope(client_api):
    put(client_api, "mine")
    put(make_key("client", project="p2"), "other-project")
    put(make_key("client", tenant="t2"), "other-tenant")
    _, body = client_api.get("sessions", state="all")
    assert [i["sessionId"] for i in body["items"]] == ["mine"]
    _, body = make_key("operator", project=None).get("sessions", state="all")
    assert {i["sessionId"] for i in body["items"]} == {"mine", "other-project"}


# --- trace and output --------------------------------------------------------------------------------


def append(run, runner="runner-1", *events):
    claimed = claim(run, runner_id=runner)
    run_services.event_append(run_id=run.id, runner_id=runner, lease_epoch=claimed.lease_epoch, events=list(events))
    return claimed


def test_trace_and_output_follow_the_active_or_last_run(client_api):
    assert_error(*client_api.get("sessions/none/trace"), 404, "schema-invalid")
    put(client_api, "empty")
    status, body = client_api.get("sessions/empty/trace")
    assert status == 200 and body == {"sessionId": "empty", "runId": None, "items": [], "count": 0, "cursor": "0"}
    run = make_run(session_id="s1")
    append(
        run,
        "runner-1",
        ("reasoning", {"text": "hmm"}),
        ("assistant_message", {"text": "hi"}),
        ("tool_call", {"name": "ls"}),
        ("diff", {"patch": "+"}),
    )
    status, trace = client_api.get("sessions/s1/trace")
    assert status == 200 and trace["sessionId"] == "s1" and trace["runId"] == run.id
    assert [e["type"] for e in trace["items"]] == [
        "backend_status",
        "backend_status",
        "reasoning",
        "assistant_message",
        "tool_call",
        "diff",
    ]
    status, output = client_api.get("sessions/s1/output", limit="1")
    # Filtered before the limit (A3): the first output event, not an empty page.
    assert [e["type"] for e in output["items"]] == ["assistant_message"]
    assert output["cursor"] == str(output["items"][0]["seq"])
    _, rest = client_api.get("sessions/s1/output", afterSeq=output["cursor"])
    assert [e["type"] for e in rest["items"]] == ["diff"]
    _, done = client_api.get("sessions/s1/output", afterSeq=rest["cursor"])
    assert done["items"] == [] and done["cursor"] == rest["cursor"]


def test_trace_of_a_given_run_must_belong_to_the_session(client_api):
    first = make_run(session_id="s1")
    second = make_run(session_id="s1")
    other = make_run(session_id="s2")
    _, body = client_api.get("sessions/s1/trace", runId=first.id)
    assert body["runId"] == first.id and {e["runId"] for e in body["items"]} == {first.id}
    _, body = client_api.get("sessions/s1/trace")
    assert body["runId"] == second.id  # the last run
    status, body = client_api.get("sessions/s1/trace", runId=other.id)
    assert_error(status, body, 404, "schema-invalid")
    assert "does not belong" in body["error"]["message"]
    assert_error(*client_api.get("sessions/s1/output", runId="run_missing"), 404, "schema-invalid")
    foreign = make_run(session_id="s1-elsewhere", tenant="t2")
    assert_error(*client_api.get("sessions/s1/trace", runId=foreign.id), 404, "schema-invalid")


def test_trace_rejects_bad_paging(client_api):
    make_run(session_id="s1")
    for params in ({"afterSeq": "-1"}, {"limit": "0"}, {"wait": "soon"}):
        assert_error(*client_api.get("sessions/s1/trace", **params), 400, "schema-invalid")


# --- storage -----------------------------------------------------------------------------------------


def test_runner_refreshes_and_evicts_storage(runner_api):
    make_run(session_id="s1")
    body = {
        "storageKind": "pvc",
        "pvcName": "pvc-1",
        "storageNamespace": "agents",
        "pvcPhase": "Bound",
        "storageSizeBytes": 2048,
        "storageFilesCount": 4,
        "storageSha256": "f" * 64,
    }
    status, session = runner_api.post("sessions/s1/storage", body)
    assert status == 200
    assert (session["storageKind"], session["storagePvcName"], session["storageNamespace"]) == (
        "pvc",
        "pvc-1",
        "agents",
    )
    assert (session["storageSizeBytes"], session["storageFilesCount"]) == (2048, 4)
    assert session["codexRolloutSubdir"] == "sessions" and session["storageUpdatedAt"] == session["updatedAt"]
    status, error = runner_api.post("sessions/s1/storage/evict", {"pvcName": "pvc-0"})
    assert_error(status, error, 409, "schema-invalid")
    status, evicted = runner_api.post("sessions/s1/storage/evict", {"pvcName": "pvc-1"})
    assert status == 200 and evicted["storageKind"] == "evicted" and evicted["storageEvictedAt"]
    assert evicted["version"] > session["version"]


@pytest.mark.parametrize(
    "body",
    [
        {"storageKind": "s3"},
        {},
        {"storageKind": "pvc", "storageSizeBytes": -1},
        {"storageKind": "pvc", "storageFilesCount": "3"},
        {"storageKind": "pvc", "pvcName": 5},
    ],
)
def test_storage_rejects_bad_bodies(runner_api, body):
    make_run(session_id="s1")
    before = Session.objects.get(pk="s1").version
    assert_error(*runner_api.post("sessions/s1/storage", body), 400, "schema-invalid")
    assert Session.objects.get(pk="s1").version == before


def test_run_scoped_runner_key_reaches_only_its_session():
    mine = make_run(session_id="s1")
    make_run(session_id="s2")
    api = make_key("runner", run=mine.id)
    assert api.post("sessions/s1/storage", {"storageKind": "pvc", "pvcName": "p"})[0] == 200
    assert_error(*api.post("sessions/s2/storage", {"storageKind": "pvc", "pvcName": "p"}), 404, "schema-invalid")
    assert_error(*api.post("sessions/s2/storage/evict", {"pvcName": "p"}), 404, "schema-invalid")


# --- roles -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "method", "path", "body"),
    [
        ("runner", "get", "sessions", None),
        ("runner", "get", "sessions/s1", None),
        ("runner", "put", "sessions/s1", {"backendProfile": "echo"}),
        ("runner", "post", "sessions/s1/read", {"readerId": "a"}),
        ("runner", "get", "sessions/s1/trace", None),
        ("runner", "get", "sessions/s1/output", None),
        ("client", "post", "sessions/s1/storage", {"storageKind": "none"}),
        ("client", "post", "sessions/s1/storage/evict", {"pvcName": "p"}),
    ],
)
def test_roles_outside_the_table_are_forbidden(role, method, path, body):
    make_run(session_id="s1")
    api = make_key(role)
    status, error = getattr(api, method)(path, body) if body is not None else api.get(path)
    assert_error(status, error, 403, "forbidden")


def test_operator_may_do_everything_in_its_tenant(operator_api):
    assert put(operator_api, "s1")[0] == 201
    assert operator_api.get("sessions/s1")[0] == 200
    assert operator_api.post("sessions/s1/storage", {"storageKind": "none"})[0] == 200
    assert operator_api.get("sessions/s1/trace")[0] == 200


def test_anonymous_is_refused(anonymous_api):
    assert_error(*anonymous_api.get("sessions"), 401, "auth-required")


def test_wrong_method_is_405(client_api):
    put(client_api, "s1")
    assert_error(*client_api.post("sessions/s1", {}), 405, "schema-invalid")
    assert_error(*client_api._send("patch", "sessions/s1", {}), 405, "schema-invalid")
