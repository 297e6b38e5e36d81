"""The queue API: wire shapes, statuses, roles, scope and bad input."""

from __future__ import annotations

import pytest

from queues.models import QueueTask
from tests.helpers import PROJECT, TENANT, assert_error, make_key

pytestmark = pytest.mark.django_db

TASK_KEYS = [
    "id",
    "tenantId",
    "projectId",
    "queue",
    "lane",
    "title",
    "priority",
    "backendProfile",
    "providerId",
    "workspaceRef",
    "sessionRef",
    "executionPolicy",
    "resourceBundleRef",
    "payload",
    "references",
    "metadata",
    "idempotencyKey",
    "webhookUrl",
    "state",
    "version",
    "payloadHash",
    "latestAttempt",
    "sessionPath",
    "createdAt",
    "updatedAt",
    "cancelledAt",
    "cancelReason",
]


def create(api, **body):
    body.setdefault("queue", "default")
    body.setdefault("backendProfile", "echo")
    body.setdefault("payload", {"prompt": "go"})
    return api.post("queue-tasks", body)


def test_create_replay_and_conflict(client_api):
    status, task = create(client_api, idempotencyKey="k", priority=3, sessionRef={"sessionId": "s 1"})
    assert status == 201 and list(task) == TASK_KEYS
    assert (task["tenantId"], task["projectId"], task["state"], task["lane"]) == (TENANT, PROJECT, "pending", "default")
    assert task["sessionPath"] == "/api/v1/sessions/s%201" and task["latestAttempt"] is None
    status, again = create(client_api, idempotencyKey="k", priority=3, sessionRef={"sessionId": "s 1"})
    assert status == 200 and again == task
    assert_error(*create(client_api, idempotencyKey="k", priority=4), 409, "schema-invalid")


@pytest.mark.parametrize(
    "body",
    [
        {"queue": None},
        {"backendProfile": "gpt"},
        {"priority": "high"},
        {"priority": 1.5},
        {"payload": [1]},
        {"executionPolicy": {"maxAttempts": 0}},
        {"executionPolicy": {"retryOn": ["whenever"]}},
        {"sessionRef": {"sessionId": ""}},
    ],
)
def test_create_rejects_bad_bodies(client_api, body):
    assert_error(*create(client_api, **body), 400, "schema-invalid")
    assert not QueueTask.objects.exists()


def test_create_outside_the_key_tenant_is_refused(client_api):
    assert_error(*create(client_api, tenantId="other"), 403, "tenant-policy-denied")
    assert not QueueTask.objects.exists()


def test_get_list_cancel_read(client_api):
    _, task = create(client_api)
    _, other = create(client_api, priority=9)
    assert client_api.get(f"queue-tasks/{task['id']}") == (200, task)
    status, page = client_api.get("queue-tasks", limit="1")
    assert status == 200 and list(page) == ["items", "count", "cursor", "nextPageToken"]
    assert page["items"][0]["id"] == other["id"] and page["cursor"] == str(other["version"])
    _, rest = client_api.get("queue-tasks", limit="1", pageToken=page["nextPageToken"])
    assert [t["id"] for t in rest["items"]] == [task["id"]] and rest["nextPageToken"] is None
    status, cancelled = client_api.post(f"queue-tasks/{task['id']}/cancel", {"reason": "no"})
    assert status == 200 and cancelled["state"] == "cancelled" and cancelled["cancelReason"] == "no"
    _, feed = client_api.get("queue-tasks", updatedAfter=str(other["version"]))
    assert [t["id"] for t in feed["items"]] == [task["id"]]
    status, cursor = client_api.post(f"queue-tasks/{task['id']}/read", {"readerId": "ana"})
    assert status == 200 and cursor["taskVersion"] == cancelled["version"]
    assert list(cursor) == ["taskId", "readerId", "taskVersion", "readAt"]


@pytest.mark.parametrize(
    "params",
    [
        {"state": "done"},
        {"limit": "0"},
        {"cursor": "x"},
        {"updatedAfter": "-1"},
        {"cursor": "1", "pageToken": "a"},
        {"pageToken": "garbage"},
    ],
)
def test_list_rejects_bad_parameters(client_api, params):
    assert_error(*client_api.get("queue-tasks", **params), 400, "schema-invalid")


def test_attempt_is_for_operators(client_api, operator_api):
    _, task = create(client_api)
    body = {"state": "running", "latestAttempt": {"runId": "r1"}, "sessionPath": None}
    assert_error(*client_api.post(f"queue-tasks/{task['id']}/attempt", body), 403, "forbidden")
    status, updated = operator_api.post(f"queue-tasks/{task['id']}/attempt", body)
    assert status == 200 and updated["state"] == "running" and updated["latestAttempt"] == {"runId": "r1"}
    assert_error(
        *operator_api.post(f"queue-tasks/{task['id']}/attempt", {**body, "state": "asleep"}), 400, "schema-invalid"
    )
    operator_api.post(f"queue-tasks/{task['id']}/cancel", {})
    assert_error(*operator_api.post(f"queue-tasks/{task['id']}/attempt", body), 409, "cancelled")


def test_stats_and_commander(client_api):
    _, first = create(client_api, lane="a")
    create(client_api, lane="b", priority=5)
    client_api.post(f"queue-tasks/{first['id']}/cancel", {})
    status, stats = client_api.get("queues/stats")
    assert status == 200 and list(stats) == ["queue", "total", "byState", "byLane", "maxVersion", "generatedAt"]
    assert stats["total"] == 2 and stats["byState"] == {"pending": 1, "cancelled": 1}
    status, snapshot = client_api.get("queues/commander", readerId="ana")
    assert status == 200 and list(snapshot) == ["queue", "readerId", "stats", "items", "generatedAt"]
    assert [t["attentionState"] for t in snapshot["items"]] == ["active", "unread"]
    assert snapshot["stats"]["generatedAt"] == snapshot["generatedAt"]
    client_api.post(f"queue-tasks/{first['id']}/read", {"readerId": "ana"})
    _, snapshot = client_api.get("queues/commander", readerId="ana")
    assert len(snapshot["items"]) == 1
    _, everything = client_api.get("queues/commander")
    assert len(everything["items"]) == 2 and everything["items"][1]["attentionState"] == "unread"


def test_scope_and_roles(client_api):
    _, theirs = create(make_key("client", tenant="t2"))
    _, other_project = create(make_key("client", project="p2"))
    for task in (theirs, other_project):
        assert_error(*client_api.get(f"queue-tasks/{task['id']}"), 404, "schema-invalid")
        assert_error(*client_api.post(f"queue-tasks/{task['id']}/cancel", {}), 404, "schema-invalid")
    assert client_api.get("queue-tasks")[1]["items"] == []
    assert client_api.get("queues/stats")[1]["total"] == 0
    runner = make_key("runner")
    assert_error(*create(runner), 403, "forbidden")
    assert_error(*runner.get("queues/commander"), 403, "forbidden")
    assert_error(*client_api.get("queue-tasks/missing"), 404, "schema-invalid")


def test_session_path_uses_the_api_form(client_api):
    _, task = create(client_api, sessionRef={"sessionId": "a b&c"})
    assert task["sessionPath"] == "/api/v1/sessions/a%20b%26c"
    client_api.post("runs", {"backendProfile": "echo", "sessionRef": {"sessionId": "a b&c"}})
    status, session = client_api.get(task["sessionPath"])  # the path leads to the session
    assert status == 200 and session["sessionId"] == "a b&c"
