"""Session ids are any storable text of 1 to 255 characters, '/' included: every session route
takes them percent-encoded as encodeURIComponent does, and `%2F` stays inside the id."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from queues.models import QueueTask
from runs import services as run_services
from runs.models import Run
from sessions.models import Session, SessionReadCursor
from tests.helpers import assert_error, make_key

pytestmark = pytest.mark.django_db

IDS = [
    "owner/repo#42",
    "a/b/c",
    "what?x=1&y=2",
    "100%",
    "%2F literally",
    "with spaces  and\ttabs",
    "naïve café ☕ 日本語",
    "emoji 😀/x",
    "../../etc/passwd",
    "/leading/and/trailing/",
    "x" * 255,
]


def path(session_id: str) -> str:
    """As a JavaScript client writes it: encodeURIComponent."""
    return "sessions/" + quote(session_id, safe="!*'()-_.~")


@pytest.mark.parametrize("session_id", IDS)
def test_put_get_read_and_list_a_session_by_its_encoded_id(client_api, session_id):
    status, body = client_api.put(path(session_id), {"backendProfile": "echo", "metadata": {"title": "t"}})
    assert status == 201, body
    assert body["sessionId"] == session_id
    assert Session.objects.filter(pk=session_id).exists()
    status, body = client_api.get(path(session_id))
    assert status == 200 and body["sessionId"] == session_id
    status, body = client_api.post(path(session_id) + "/read", {"readerId": "me"})
    assert status == 200, body
    assert SessionReadCursor.objects.filter(session_id=session_id, reader_id="me").exists()
    status, body = client_api.put(path(session_id), {"backendProfile": "echo", "metadata": {"title": "u"}})
    assert status == 200 and body["title"] == "u"
    status, page = client_api.get("sessions", state="all")
    assert [item["sessionId"] for item in page["items"]] == [session_id]


@pytest.mark.parametrize("session_id", ["owner/repo#42", "100%/x", "naïve/日本"])
def test_runs_create_sessions_with_such_ids_and_trace_and_output_follow_them(client_api, session_id):
    status, run = client_api.post("runs", {"backendProfile": "echo", "sessionRef": {"sessionId": session_id}})
    assert status == 201, run
    assert Run.objects.get(pk=run["id"]).session_id == session_id
    status, trace = client_api.get(path(session_id) + "/trace")
    assert status == 200, trace
    assert trace["sessionId"] == session_id and trace["runId"] == run["id"]
    assert [item["payload"]["phase"] for item in trace["items"]] == ["run-created"]
    status, output = client_api.get(path(session_id) + "/output")
    assert status == 200 and output["runId"] == run["id"]


def test_a_queue_task_session_path_leads_to_its_session(client_api):
    session_id = "owner/repo#42 ?%"
    status, task = client_api.post(
        "queue-tasks", {"queue": "q", "backendProfile": "echo", "sessionRef": {"sessionId": session_id}}
    )
    assert status == 201, task
    assert task["sessionPath"] == "/api/v1/sessions/owner%2Frepo%2342%20%3F%25"
    assert QueueTask.objects.get(pk=task["id"]).session_path == task["sessionPath"]
    client_api.put(path(session_id), {"backendProfile": "echo"})
    status, body = client_api.get(task["sessionPath"])
    assert status == 200 and body["sessionId"] == session_id


def test_storage_routes_take_encoded_ids(db):
    run = run_services.run_create(
        tenant_id="acme", project_id="web", backend_profile="echo", session_ref={"sessionId": "o/r#1"}
    )[0]
    runner = make_key("runner", run=run.id)
    status, body = runner.post(path("o/r#1") + "/storage", {"storageKind": "pvc", "pvcName": "pvc-1"})
    assert status == 200, body
    status, body = runner.post(path("o/r#1") + "/storage/evict", {"pvcName": "pvc-1"})
    assert status == 200, body
    assert Session.objects.get(pk="o/r#1").storage_evicted_at is not None


def test_a_decoded_slash_is_a_path_separator_not_part_of_the_id(client_api):
    client_api.put(path("a/b"), {"backendProfile": "echo"})
    # The literal path /sessions/a/b is another route (none), not the session "a/b".
    assert_error(*client_api.get("sessions/a/b"), 404, "schema-invalid")
    # A literal "%2F" in an id is sent as %252F and stays literal.
    status, body = client_api.put(path("a%2Fb"), {"backendProfile": "echo"})
    assert status == 201 and body["sessionId"] == "a%2Fb"
    assert set(Session.objects.values_list("pk", flat=True)) == {"a/b", "a%2Fb"}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("sessions/a%00b", "path"),
        ("sessions/%C3%28", "path"),  # invalid UTF-8 once decoded
    ],
)
def test_unstorable_or_undecodable_ids_in_the_path_are_400(client_api, raw, field):
    assert_error(*client_api.put(raw, {"backendProfile": "echo"}), 400, "schema-invalid")
    assert not Session.objects.exists()


def test_ids_of_256_characters_or_empty_are_refused(client_api):
    status, body = client_api.post("runs", {"backendProfile": "echo", "sessionRef": {"sessionId": "x" * 256}})
    assert_error(status, body, 400, "schema-invalid")
    assert body["error"]["details"]["field"] == "sessionRef.sessionId"
    status, body = client_api.put(path("x" * 256), {"backendProfile": "echo"})
    assert_error(status, body, 400, "schema-invalid")
    assert not Session.objects.exists() and not Run.objects.exists()
