"""HTTP tests for runs, events, runners, runner jobs, health, backends, livez/readyz and the schema."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from runs import services
from runs.models import Command, EventBatch, Run, RunEvent, Runner, RunnerJob
from tests.helpers import PROJECT, TENANT, assert_error, claim, events_of, make_key, make_run, phases

pytestmark = pytest.mark.django_db


ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

RUN_KEYS = {
    "id",
    "tenantId",
    "projectId",
    "backendProfile",
    "sessionRef",
    "resourceBundleRef",
    "providerId",
    "workspaceRef",
    "executionPolicy",
    "metadata",
    "idempotencyKey",
    "webhookUrl",
    "status",
    "terminalStatus",
    "failureKind",
    "failureMessage",
    "claimedBy",
    "leaseExpiresAt",
    "leaseEpoch",
    "createdAt",
    "updatedAt",
}
EVENT_KEYS = {"id", "runId", "seq", "type", "payload", "createdAt"}
HEALTH_KEYS = {
    "adapter",
    "ready",
    "reachable",
    "migrationReady",
    "migrationId",
    "failureKind",
    "message",
    "credentialValuesPrinted",
}
JOB_KEYS = {
    "id",
    "runId",
    "commandId",
    "idempotencyKey",
    "payloadHash",
    "attemptId",
    "runnerId",
    "namespace",
    "jobName",
    "managerUrl",
    "image",
    "sourceCommit",
    "serviceAccountName",
    "result",
    "createdAt",
    "updatedAt",
}
GHP = "ghp_" + "a" * 36


def db_run(run_id) -> Run:
    return Run.objects.get(pk=run_id)


def claimed_run(runner_id="runner-1", times=1, **kwargs):
    run = make_run(**kwargs)
    for _ in range(times):
        run = claim(run, runner_id=runner_id)
    return run


def http_claim(api, run_id, runner_id="runner-1", lease_ms=60_000):
    return api.post(f"runs/{run_id}/claim", {"runnerId": runner_id, "leaseMs": lease_ms})


def finish_body(epoch, runner_id="runner-1", status="completed", **extra):
    return {"runnerId": runner_id, "leaseEpoch": epoch, "terminalStatus": status, **extra}


def snapshot(run_id):
    """Everything a runner call could change on a run."""
    run = db_run(run_id)
    return (
        run.status,
        run.claimed_by,
        run.lease_expires_at,
        run.lease_epoch,
        run.terminal_status,
        run.updated_at,
        [(e.seq, e.type, e.payload) for e in events_of(run_id)],
        list(Command.objects.filter(run_id=run_id).order_by("seq").values_list("state", "updated_at")),
    )


# --- health, livez, readyz, schema, docs, backends ------------------------------------------


def test_health_needs_no_key_and_has_store_health_keys(anonymous_api):
    status, body = anonymous_api.get("health")
    assert status == 200
    assert set(body) == HEALTH_KEYS
    assert body["adapter"] in {"embedded-postgres", "postgres"}
    assert body["ready"] is True and body["reachable"] is True and body["migrationReady"] is True
    assert isinstance(body["migrationId"], str) and body["migrationId"]
    assert body["failureKind"] is None and body["message"] is None
    assert body["credentialValuesPrinted"] is False


def test_livez_and_readyz_answer_without_key(anonymous_api):
    assert anonymous_api.get("/livez")[0] == 200
    status, body = anonymous_api.get("/readyz")
    assert status == 200
    assert body["status"] == "ready"


def test_schema_and_docs_are_served(anonymous_api):
    response = anonymous_api.client.get("/api/v1/schema/")
    assert response.status_code == 200
    text = response.content.decode()
    assert "openapi" in text and "/api/v1/runs" in text
    docs = anonymous_api.client.get("/api/v1/docs/")
    assert docs.status_code == 200
    assert b"swagger" in docs.content.lower()


def test_backends_lists_profiles_and_capabilities(client_api):
    status, body = client_api.get("backends")
    assert status == 200
    assert set(body) == {"items", "count"}
    assert body["count"] == len(body["items"]) == 3
    by_profile = {item["profile"]: item for item in body["items"]}
    assert set(by_profile) == {"echo", "codex", "claude-code"}
    for item in body["items"]:
        assert set(item) == {"profile", "capabilities"}
        assert {"steer", "threads", "resume", "diffs", "sandbox"} <= set(item["capabilities"])
        assert all(isinstance(v, bool) for v in item["capabilities"].values())
    assert by_profile["echo"]["capabilities"]["steer"] is True
    assert by_profile["codex"]["capabilities"]["steer"] is False
    assert by_profile["claude-code"]["capabilities"]["steer"] is False


def test_backends_needs_a_key(anonymous_api):
    assert_error(*anonymous_api.get("backends"), 401, "auth-required")


def test_backends_open_to_runner(runner_api):
    status, body = runner_api.get("backends")
    assert status == 200 and body["count"] == 3


# --- runs: create and get ---------------------------------------------------------------------


def test_create_run_returns_201_with_exact_shape(client_api):
    status, body = client_api.post("runs", {"backendProfile": "echo", "providerId": "p1", "metadata": {"a": 1}})
    assert status == 201, body
    assert set(body) == RUN_KEYS
    assert body["id"].startswith("run")
    assert body["tenantId"] == TENANT and body["projectId"] == PROJECT
    assert body["backendProfile"] == "echo"
    assert body["status"] == "pending"
    assert body["leaseEpoch"] == 0
    assert body["providerId"] == "p1" and body["metadata"] == {"a": 1}
    for key in (
        "sessionRef",
        "resourceBundleRef",
        "terminalStatus",
        "failureKind",
        "failureMessage",
        "claimedBy",
        "leaseExpiresAt",
        "idempotencyKey",
        "webhookUrl",
        "workspaceRef",
        "executionPolicy",
    ):
        assert body[key] is None, key
    assert ISO_MS.match(body["createdAt"]) and ISO_MS.match(body["updatedAt"])
    assert phases(body["id"]) == [("backend_status", "run-created")]
    created = events_of(body["id"])[0].payload
    assert created == {"phase": "run-created", "backendProfile": "echo", "sessionRef": None, "resourceBundleRef": None}


def test_create_run_copies_unknown_input_fields(client_api):
    status, body = client_api.post("runs", {"backendProfile": "echo", "customField": {"x": [1, 2]}})
    assert status == 201
    assert body["customField"] == {"x": [1, 2]}
    assert client_api.get(f"runs/{body['id']}")[1]["customField"] == {"x": [1, 2]}


def test_create_run_with_session_ref_and_bundle(client_api):
    ref = {"sessionId": "sess-1", "metadata": {"title": "Hello"}}
    bundle = {"kind": "git", "repoUrl": "https://example.com/r.git", "bundles": [{"subpath": "a", "targetPath": "b"}]}
    status, body = client_api.post("runs", {"backendProfile": "echo", "sessionRef": ref, "resourceBundleRef": bundle})
    assert status == 201, body
    assert body["sessionRef"]["sessionId"] == "sess-1"
    assert body["resourceBundleRef"] == bundle
    payload = events_of(body["id"])[0].payload
    assert payload["sessionRef"] == {
        "sessionId": "sess-1",
        "conversationId": None,
        "threadId": None,
        "expiresAt": None,
        "metadataKeys": ["title"],
        "valuesPrinted": False,
    }
    assert payload["resourceBundleRef"]["kind"] == "git"
    assert payload["resourceBundleRef"]["bundles"]["count"] == 1


def test_create_run_idempotent_replay_is_200_same_record(client_api):
    body = {"backendProfile": "echo", "idempotencyKey": "k-1", "metadata": {"m": 1}}
    status1, first = client_api.post("runs", body)
    status2, second = client_api.post("runs", body)
    assert (status1, status2) == (201, 200)
    assert second == first
    assert Run.objects.filter(idempotency_key="k-1").count() == 1
    assert len(events_of(first["id"])) == 1


def test_create_run_same_key_other_input_is_409(client_api):
    assert client_api.post("runs", {"backendProfile": "echo", "idempotencyKey": "k-2"})[0] == 201
    assert_error(*client_api.post("runs", {"backendProfile": "codex", "idempotencyKey": "k-2"}), 409, "schema-invalid")
    assert Run.objects.filter(idempotency_key="k-2").count() == 1


def test_create_run_unknown_backend_is_400(client_api):
    assert_error(*client_api.post("runs", {"backendProfile": "gpt"}), 400, "schema-invalid")
    assert_error(*client_api.post("runs", {}), 400, "schema-invalid")
    assert Run.objects.count() == 0


def test_get_run_returns_the_record(client_api, runner_api):
    run = make_run()
    for api in (client_api, runner_api):
        status, body = api.get(f"runs/{run.id}")
        assert status == 200
        assert set(body) == RUN_KEYS
        assert body["id"] == run.id and body["status"] == "pending"


def test_get_missing_run_is_404(client_api):
    assert_error(*client_api.get("runs/run_missing"), 404, "schema-invalid")


def test_routes_answer_with_trailing_slash(client_api):
    run = make_run()
    assert client_api.get(f"runs/{run.id}/")[0] == 200


# --- claim -------------------------------------------------------------------------------------


def test_claim_returns_epoch_1_then_2(runner_api):
    run = make_run()
    status, body = http_claim(runner_api, run.id)
    assert status == 200, body
    assert set(body) == RUN_KEYS
    assert body["status"] == "claimed" and body["claimedBy"] == "runner-1"
    assert body["leaseEpoch"] == 1
    assert ISO_MS.match(body["leaseExpiresAt"])
    status, body = http_claim(runner_api, run.id)
    assert status == 200 and body["leaseEpoch"] == 2
    status, body = http_claim(runner_api, run.id)
    assert body["leaseEpoch"] == 3
    assert phases(run.id) == [("backend_status", "run-created")] + [("backend_status", "run-claimed")] * 3
    assert events_of(run.id)[1].payload == {"phase": "run-claimed", "runnerId": "runner-1"}


def test_claim_lease_ms_defaults_to_60s(runner_api):
    run = make_run()
    status, _body = runner_api.post(f"runs/{run.id}/claim", {"runnerId": "runner-1"})
    assert status == 200
    stored = db_run(run.id)
    assert stored.lease_expires_at - stored.claimed_at == timedelta(milliseconds=60_000)


def test_claim_by_other_runner_during_live_lease_is_409(runner_api):
    run = claimed_run()
    before = snapshot(run.id)
    assert_error(*http_claim(runner_api, run.id, runner_id="runner-2"), 409, "runner-lease-conflict")
    assert snapshot(run.id) == before


def test_claim_after_lease_lapsed_takes_over_and_fences_old_epoch(runner_api):
    run = claimed_run()
    Run.objects.filter(pk=run.id).update(lease_expires_at=db_run(run.id).claimed_at - timedelta(seconds=1))
    status, body = http_claim(runner_api, run.id, runner_id="runner-2")
    assert status == 200 and body["claimedBy"] == "runner-2" and body["leaseEpoch"] == 2
    assert_error(
        *runner_api.post(f"runs/{run.id}/heartbeat", {"runnerId": "runner-1", "leaseEpoch": 1}),
        409,
        "runner-lease-conflict",
    )


@pytest.mark.parametrize("lease_ms", [0, 3_600_001, "abc", -5, 1.5, True])
def test_claim_lease_ms_out_of_range_is_400(runner_api, lease_ms):
    run = make_run()
    assert_error(*http_claim(runner_api, run.id, lease_ms=lease_ms), 400, "schema-invalid")
    assert db_run(run.id).lease_epoch == 0


@pytest.mark.parametrize("lease_ms", [1, 3_600_000])
def test_claim_lease_ms_bounds_are_accepted(runner_api, lease_ms):
    run = make_run()
    assert http_claim(runner_api, run.id, lease_ms=lease_ms)[0] == 200


@pytest.mark.parametrize(
    ("terminal", "kind"),
    [
        ({"terminalStatus": "failed", "failureKind": "agent-failed"}, "agent-failed"),
        ({"terminalStatus": "completed"}, "schema-invalid"),
    ],
)
def test_claim_terminal_run_is_409_with_run_failure_kind(runner_api, terminal, kind):
    run = claimed_run()
    services.run_finish(
        run_id=run.id,
        runner_id="runner-1",
        lease_epoch=1,
        terminal_status=terminal["terminalStatus"],
        failure_kind=terminal.get("failureKind"),
    )
    assert_error(*http_claim(runner_api, run.id), 409, kind)


def test_claim_cancelled_run_is_409_cancelled(runner_api):
    run = make_run()
    services.run_cancel(run_id=run.id)
    assert_error(*http_claim(runner_api, run.id), 409, "cancelled")


def test_claim_missing_run_is_404(runner_api):
    assert_error(*http_claim(runner_api, "run_nope"), 404, "schema-invalid")


# --- heartbeat ---------------------------------------------------------------------------------


def test_heartbeat_renews_lease(runner_api):
    run = claimed_run()
    status, body = runner_api.post(
        f"runs/{run.id}/heartbeat", {"runnerId": "runner-1", "leaseEpoch": 1, "leaseMs": 120_000}
    )
    assert status == 200, body
    assert set(body) == RUN_KEYS and body["leaseEpoch"] == 1 and body["status"] == "claimed"
    stored = db_run(run.id)
    assert timedelta(seconds=120) <= stored.lease_expires_at - stored.claimed_at < timedelta(seconds=130)
    assert phases(run.id) == [("backend_status", "run-created"), ("backend_status", "run-claimed")]


@pytest.mark.parametrize(("runner_id", "epoch"), [("runner-1", 1), ("runner-2", 2), ("runner-1", 3)])
def test_heartbeat_stale_epoch_or_other_runner_is_409_and_writes_nothing(runner_api, runner_id, epoch):
    run = claimed_run(times=2)  # epoch 2
    before = snapshot(run.id)
    body = {"runnerId": runner_id, "leaseEpoch": epoch, "leaseMs": 999_000}
    assert_error(*runner_api.post(f"runs/{run.id}/heartbeat", body), 409, "runner-lease-conflict")
    assert snapshot(run.id) == before


@pytest.mark.parametrize("lease_ms", [0, 3_600_001, "abc"])
def test_heartbeat_lease_ms_out_of_range_is_400(runner_api, lease_ms):
    run = claimed_run()
    before = snapshot(run.id)
    body = {"runnerId": "runner-1", "leaseEpoch": 1, "leaseMs": lease_ms}
    assert_error(*runner_api.post(f"runs/{run.id}/heartbeat", body), 400, "schema-invalid")
    assert snapshot(run.id) == before


def test_heartbeat_on_unclaimed_run_is_409(runner_api):
    run = make_run()
    assert_error(
        *runner_api.post(f"runs/{run.id}/heartbeat", {"runnerId": "runner-1", "leaseEpoch": 0}),
        409,
        "runner-lease-conflict",
    )


def test_heartbeat_on_terminal_run_returns_it_unchanged_whatever_the_epoch(runner_api, client_api):
    run = claimed_run()
    client_api.post(f"runs/{run.id}/cancel", {})
    _, current = runner_api.get(f"runs/{run.id}")
    before = snapshot(run.id)
    for runner_id, epoch in (("runner-1", 1), ("runner-9", 77), ("runner-1", 0)):
        status, body = runner_api.post(f"runs/{run.id}/heartbeat", {"runnerId": runner_id, "leaseEpoch": epoch})
        assert status == 200
        assert body == current
    assert snapshot(run.id) == before


# --- finish ------------------------------------------------------------------------------------


def test_finish_completes_run_clears_lease_keeps_claimed_by(runner_api):
    run = claimed_run()
    status, body = runner_api.post(f"runs/{run.id}/finish", finish_body(1, failureMessage="done"))
    assert status == 200, body
    assert set(body) == RUN_KEYS
    assert body["status"] == "completed" and body["terminalStatus"] == "completed"
    assert body["failureKind"] is None and body["failureMessage"] == "done"
    assert body["leaseExpiresAt"] is None and body["claimedBy"] == "runner-1"
    assert body["leaseEpoch"] == 1
    last = events_of(run.id)[-1]
    assert last.type == "terminal_status"
    assert last.payload == {"terminalStatus": "completed", "failureKind": None, "message": "done"}


@pytest.mark.parametrize(
    ("terminal_status", "run_status"),
    [("failed", "failed"), ("blocked", "blocked"), ("timeout", "failed"), ("cancelled", "cancelled")],
)
def test_finish_maps_terminal_status(runner_api, terminal_status, run_status):
    run = claimed_run()
    status, body = runner_api.post(
        f"runs/{run.id}/finish", finish_body(1, status=terminal_status, failureKind="agent-failed")
    )
    assert status == 200
    assert body["status"] == run_status and body["terminalStatus"] == terminal_status
    assert body["failureKind"] == "agent-failed"


def test_finish_without_message_emits_null_message(runner_api):
    run = claimed_run()
    runner_api.post(f"runs/{run.id}/finish", finish_body(1))
    assert events_of(run.id)[-1].payload == {"terminalStatus": "completed", "failureKind": None, "message": None}


def test_finish_unknown_terminal_status_is_400(runner_api):
    run = claimed_run()
    before = snapshot(run.id)
    assert_error(*runner_api.post(f"runs/{run.id}/finish", finish_body(1, status="done")), 400, "schema-invalid")
    assert snapshot(run.id) == before


@pytest.mark.parametrize(("runner_id", "epoch"), [("runner-1", 1), ("runner-2", 2)])
def test_finish_stale_epoch_or_other_runner_is_409_and_writes_nothing(runner_api, runner_id, epoch):
    run = claimed_run(times=2)
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "hi"})
    before = snapshot(run.id)
    assert_error(
        *runner_api.post(f"runs/{run.id}/finish", finish_body(epoch, runner_id=runner_id)), 409, "runner-lease-conflict"
    )
    assert snapshot(run.id) == before


def test_finish_on_terminal_run_returns_it_unchanged_whatever_the_epoch(runner_api):
    run = claimed_run()
    _, first = runner_api.post(f"runs/{run.id}/finish", finish_body(1, status="failed", failureKind="agent-failed"))
    before = snapshot(run.id)
    for runner_id, epoch in (("runner-1", 1), ("runner-3", 42)):
        status, body = runner_api.post(f"runs/{run.id}/finish", finish_body(epoch, runner_id=runner_id))
        assert status == 200
        assert body == first
    assert snapshot(run.id) == before


def test_finish_cancels_open_commands_with_run_finished_before_terminal(runner_api):
    run = claimed_run()
    turn, _ = services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "a"})
    steer, _ = services.command_create(run_id=run.id, command_type="steer", payload={"text": "b"})
    done, _ = services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "c"})
    services.command_finish(command_id=done.id, runner_id="runner-1", lease_epoch=1, terminal_status="completed")
    start = len(events_of(run.id))
    status, _body = runner_api.post(f"runs/{run.id}/finish", finish_body(1))
    assert status == 200
    new = events_of(run.id)[start:]
    assert [(e.type, e.payload.get("phase")) for e in new] == [
        ("backend_status", "command-terminal"),
        ("backend_status", "command-terminal"),
        ("terminal_status", None),
    ]
    for event, command in zip(new[:2], (turn, steer), strict=True):
        assert event.payload == {
            "phase": "command-terminal",
            "commandId": command.id,
            "state": "cancelled",
            "terminalStatus": "cancelled",
            "failureKind": "cancelled",
            "message": "run finished",
        }
    assert not any(e.payload.get("phase") == "cancel-requested" for e in events_of(run.id))
    states = dict(Command.objects.filter(run_id=run.id).values_list("id", "state"))
    assert states == {turn.id: "cancelled", steer.id: "cancelled", done.id: "completed"}


def test_finish_with_thread_emits_session_updated_before_terminal(runner_api):
    run = make_run(session_id="sess-thread")
    claim(run)
    status, body = runner_api.post(f"runs/{run.id}/finish", finish_body(1, threadId="th-1", turnId="tu-1"))
    assert status == 200
    assert body["sessionRef"]["threadId"] == "th-1"
    tail = events_of(run.id)[-2:]
    assert [(e.type, e.payload.get("phase")) for e in tail] == [
        ("backend_status", "session-updated"),
        ("terminal_status", None),
    ]
    assert set(tail[0].payload) == {"phase", "sessionRef", "turnId"}
    assert tail[0].payload["turnId"] == "tu-1"
    assert tail[0].payload["sessionRef"]["threadId"] == "th-1"
    assert tail[0].payload["sessionRef"]["valuesPrinted"] is False


# --- cancel ------------------------------------------------------------------------------------


def test_cancel_run_event_order_and_fields(client_api):
    run = claimed_run()
    c1, _ = services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "a"})
    c2, _ = services.command_create(run_id=run.id, command_type="steer", payload={})
    start = len(events_of(run.id))
    status, body = client_api.post(f"runs/{run.id}/cancel", {"reason": "user stop"})
    assert status == 200, body
    assert set(body) == RUN_KEYS
    assert body["status"] == "cancelled" and body["terminalStatus"] == "cancelled"
    assert body["failureKind"] == "cancelled" and body["failureMessage"] == "user stop"
    assert body["leaseExpiresAt"] is None and body["claimedBy"] == "runner-1"
    new = [e.payload for e in events_of(run.id)[start:]]
    assert new == [
        {
            "phase": "command-terminal",
            "commandId": c1.id,
            "state": "cancelled",
            "terminalStatus": "cancelled",
            "failureKind": "cancelled",
        },
        {
            "phase": "command-terminal",
            "commandId": c2.id,
            "state": "cancelled",
            "terminalStatus": "cancelled",
            "failureKind": "cancelled",
        },
        {"phase": "cancel-requested", "reason": "user stop"},
        {"terminalStatus": "cancelled", "failureKind": "cancelled", "message": "user stop"},
    ]
    assert [e.type for e in events_of(run.id)[start:]][-1] == "terminal_status"


def test_cancel_default_reason_and_repeat_is_unchanged(client_api):
    run = make_run()
    status, first = client_api.post(f"runs/{run.id}/cancel")
    assert status == 200 and first["failureMessage"] == "cancel requested"
    before = snapshot(run.id)
    status, again = client_api.post(f"runs/{run.id}/cancel", {"reason": "other"})
    assert status == 200 and again == first
    assert snapshot(run.id) == before


def test_cancel_missing_run_is_404(client_api):
    assert_error(*client_api.post("runs/run_gone/cancel"), 404, "schema-invalid")


# --- events: append ---------------------------------------------------------------------------


def test_append_single_event_is_201_bare_event(runner_api):
    run = claimed_run()
    body = {"runnerId": "runner-1", "leaseEpoch": 1, "type": "assistant_message", "payload": {"text": "hi"}}
    status, event = runner_api.post(f"runs/{run.id}/events", body)
    assert status == 201, event
    assert set(event) == EVENT_KEYS
    assert event["runId"] == run.id and event["seq"] == 3 and event["type"] == "assistant_message"
    assert event["payload"] == {"text": "hi"}
    assert event["id"].startswith("evt") and ISO_MS.match(event["createdAt"])


def test_append_batch_is_201_items_count(runner_api):
    run = claimed_run()
    body = {
        "runnerId": "runner-1",
        "leaseEpoch": 1,
        "events": [
            {"type": "reasoning", "payload": {"n": 1}},
            {"type": "usage", "payload": {"inputTokens": 5}},
            {"type": "diff"},
        ],
    }
    status, page = runner_api.post(f"runs/{run.id}/events", body)
    assert status == 201, page
    assert {"items", "count"} <= set(page)
    assert page["count"] == 3
    assert [e["seq"] for e in page["items"]] == [3, 4, 5]
    assert [set(e) for e in page["items"]] == [EVENT_KEYS] * 3
    assert page["items"][1]["payload"] == {"inputTokens": 5}
    assert page["items"][2]["payload"] == {}


def test_batch_key_replay_is_200_and_writes_nothing(runner_api):
    run = claimed_run()
    body = {
        "runnerId": "runner-1",
        "leaseEpoch": 1,
        "batchKey": "b-1",
        "events": [{"type": "assistant_message", "payload": {"text": "x"}}],
    }
    status1, first = runner_api.post(f"runs/{run.id}/events", body)
    count = RunEvent.objects.filter(run_id=run.id).count()
    status2, second = runner_api.post(f"runs/{run.id}/events", body)
    assert (status1, status2) == (201, 200)
    assert second["items"] == first["items"]
    assert RunEvent.objects.filter(run_id=run.id).count() == count
    assert EventBatch.objects.filter(run_id=run.id).count() == 1


def test_batch_key_with_other_events_is_409(runner_api):
    run = claimed_run()
    body = {
        "runnerId": "runner-1",
        "leaseEpoch": 1,
        "batchKey": "b-2",
        "events": [{"type": "assistant_message", "payload": {"text": "x"}}],
    }
    runner_api.post(f"runs/{run.id}/events", body)
    count = RunEvent.objects.filter(run_id=run.id).count()
    body["events"][0]["payload"] = {"text": "y"}
    assert_error(*runner_api.post(f"runs/{run.id}/events", body), 409, "schema-invalid")
    assert RunEvent.objects.filter(run_id=run.id).count() == count


def test_batch_over_500_is_400_and_500_is_accepted(runner_api):
    run = claimed_run()
    count = RunEvent.objects.filter(run_id=run.id).count()
    too_many = {"runnerId": "runner-1", "leaseEpoch": 1, "events": [{"type": "usage", "payload": {}}] * 501}
    assert_error(*runner_api.post(f"runs/{run.id}/events", too_many), 400, "schema-invalid")
    assert RunEvent.objects.filter(run_id=run.id).count() == count
    too_many["events"] = too_many["events"][:500]
    status, page = runner_api.post(f"runs/{run.id}/events", too_many)
    assert status == 201 and page["count"] == 500


def test_empty_batch_is_400(runner_api):
    run = claimed_run()
    assert_error(
        *runner_api.post(f"runs/{run.id}/events", {"runnerId": "runner-1", "leaseEpoch": 1, "events": []}),
        400,
        "schema-invalid",
    )


def test_unknown_event_type_is_400_and_writes_nothing(runner_api):
    run = claimed_run()
    count = RunEvent.objects.filter(run_id=run.id).count()
    single = {"runnerId": "runner-1", "leaseEpoch": 1, "type": "nonsense", "payload": {}}
    assert_error(*runner_api.post(f"runs/{run.id}/events", single), 400, "schema-invalid")
    batch = {
        "runnerId": "runner-1",
        "leaseEpoch": 1,
        "events": [{"type": "assistant_message", "payload": {"a": 1}}, {"type": "nonsense", "payload": {}}],
    }
    assert_error(*runner_api.post(f"runs/{run.id}/events", batch), 400, "schema-invalid")
    assert RunEvent.objects.filter(run_id=run.id).count() == count


@pytest.mark.parametrize("payload", [[1, 2], "text", 5, None])
def test_event_payload_not_an_object_is_400(runner_api, payload):
    run = claimed_run()
    count = RunEvent.objects.filter(run_id=run.id).count()
    single = {"runnerId": "runner-1", "leaseEpoch": 1, "type": "assistant_message", "payload": payload}
    assert_error(*runner_api.post(f"runs/{run.id}/events", single), 400, "schema-invalid")
    batch = {
        "runnerId": "runner-1",
        "leaseEpoch": 1,
        "events": [{"type": "usage", "payload": {}}, {"type": "usage", "payload": payload}],
    }
    assert_error(*runner_api.post(f"runs/{run.id}/events", batch), 400, "schema-invalid")
    assert RunEvent.objects.filter(run_id=run.id).count() == count


def test_event_payload_is_redacted_before_storage(runner_api):
    run = claimed_run()
    payload = {
        "githubToken": "plain-value",
        "text": f"export T={GHP}",
        "inputTokens": 12,
        "credentialRef": "my-secret-ref",
        "nested": {"password": {"deep": 1}},
    }
    body = {"runnerId": "runner-1", "leaseEpoch": 1, "type": "command_output", "payload": payload}
    status, event = runner_api.post(f"runs/{run.id}/events", body)
    assert status == 201
    expected = {
        "githubToken": "[REDACTED]",
        "text": "export T=[REDACTED]",
        "inputTokens": 12,
        "credentialRef": "my-secret-ref",
        "nested": {"password": "[REDACTED]"},
        "redactedPaths": ["/githubToken", "/nested/password", "/text"],
    }
    assert event["payload"] == expected
    stored = RunEvent.objects.get(pk=event["id"]).payload
    assert stored == expected
    assert GHP not in str(stored) and "plain-value" not in str(stored)


@pytest.mark.parametrize(("runner_id", "epoch"), [("runner-1", 1), ("runner-2", 2), ("runner-1", 5)])
def test_append_with_stale_epoch_or_other_runner_is_409_and_writes_nothing(runner_api, runner_id, epoch):
    run = claimed_run(times=2)
    before = snapshot(run.id)
    body = {"runnerId": runner_id, "leaseEpoch": epoch, "events": [{"type": "usage", "payload": {}}], "batchKey": "bk"}
    assert_error(*runner_api.post(f"runs/{run.id}/events", body), 409, "runner-lease-conflict")
    assert snapshot(run.id) == before
    assert not EventBatch.objects.filter(run_id=run.id).exists()


def test_late_flush_by_last_epoch_after_finish_allowed_older_refused(runner_api):
    run = claimed_run(times=2)
    assert runner_api.post(f"runs/{run.id}/finish", finish_body(2))[0] == 200
    count = RunEvent.objects.filter(run_id=run.id).count()
    old = {"runnerId": "runner-1", "leaseEpoch": 1, "type": "assistant_message", "payload": {"t": "late"}}
    assert_error(*runner_api.post(f"runs/{run.id}/events", old), 409, "runner-lease-conflict")
    assert RunEvent.objects.filter(run_id=run.id).count() == count
    status, event = runner_api.post(f"runs/{run.id}/events", {**old, "leaseEpoch": 2})
    assert status == 201
    assert event["seq"] == count + 1
    assert db_run(run.id).status == "completed"


def test_append_to_missing_run_is_404(runner_api):
    body = {"runnerId": "runner-1", "leaseEpoch": 1, "type": "usage", "payload": {}}
    assert_error(*runner_api.post("runs/run_nope/events", body), 404, "schema-invalid")


# --- events: read ------------------------------------------------------------------------------


def test_list_events_page_shape_and_cursor(client_api):
    run = claimed_run()
    status, page = client_api.get(f"runs/{run.id}/events")
    assert status == 200
    assert set(page) == {"items", "count", "cursor"}
    assert page["count"] == 2 and page["cursor"] == "2"
    assert [e["seq"] for e in page["items"]] == [1, 2]
    assert all(set(e) == EVENT_KEYS for e in page["items"])
    status, page = client_api.get(f"runs/{run.id}/events", afterSeq=1, limit=5)
    assert [e["seq"] for e in page["items"]] == [2] and page["cursor"] == "2"
    status, page = client_api.get(f"runs/{run.id}/events", limit=1)
    assert page["count"] == 1 and page["cursor"] == "1"


def test_list_events_empty_page_echoes_after_seq(client_api):
    run = make_run()
    status, page = client_api.get(f"runs/{run.id}/events", afterSeq=7)
    assert status == 200
    assert page == {"items": [], "count": 0, "cursor": "7"}


def test_list_events_empty_page_cursor_is_0_without_after_seq(client_api):
    run = make_run()
    RunEvent.objects.filter(run_id=run.id).delete()
    status, page = client_api.get(f"runs/{run.id}/events")
    assert status == 200 and page == {"items": [], "count": 0, "cursor": "0"}


def test_list_events_long_poll_times_out_with_empty_page(client_api):
    run = make_run()
    status, page = client_api.get(f"runs/{run.id}/events", afterSeq=1, wait="0.01")
    assert status == 200 and page == {"items": [], "count": 0, "cursor": "1"}


def test_list_events_wait_returns_at_once_when_items_exist(client_api):
    run = make_run()
    status, page = client_api.get(f"runs/{run.id}/events", wait="100")
    assert status == 200 and page["count"] == 1


def test_list_events_missing_run_is_404(client_api):
    assert_error(*client_api.get("runs/run_none/events"), 404, "schema-invalid")


# --- runners -----------------------------------------------------------------------------------


def test_register_runner_201_new_then_200_known(runner_api):
    status, body = runner_api.post("runners", {"runnerId": "pod-1", "pool": "a", "labels": {"zone": "z"}})
    assert status == 201, body
    assert body["id"] == "pod-1" and body["pool"] == "a" and body["labels"] == {"zone": "z"}
    assert ISO_MS.match(body["registeredAt"]) and ISO_MS.match(body["heartbeatAt"])
    status, again = runner_api.post("runners", {"runnerId": "pod-1", "pool": "b"})
    assert status == 200, again
    assert again["id"] == "pod-1" and again["pool"] == "b"
    assert again["registeredAt"] == body["registeredAt"]
    assert Runner.objects.filter(pk="pod-1").count() == 1


@pytest.mark.django_db(transaction=True)
def test_register_same_runner_twice_with_same_fields_is_200():
    api = make_key("runner")
    assert api.post("runners", {"runnerId": "pod-same", "pool": "a"})[0] == 201
    status, body = api.post("runners", {"runnerId": "pod-same", "pool": "a"})
    assert status == 200, body
    assert body["id"] == "pod-same" and body["pool"] == "a"


def test_register_same_runner_twice_in_one_transaction_is_200(runner_api):
    """Two registrations sharing a database clock (one transaction, as in this test) must still
    tell a known runner from a new one."""
    assert runner_api.post("runners", {"runnerId": "pod-tx", "pool": "a"})[0] == 201
    status, _ = runner_api.post("runners", {"runnerId": "pod-tx", "pool": "a"})
    assert status == 200


def test_register_runner_without_id_generates_one(runner_api):
    status, body = runner_api.post("runners", {"hostname": "h1"})
    assert status == 201
    assert body["id"].startswith("runner") and body["hostname"] == "h1"
    assert set(body) == {"id", "registeredAt", "heartbeatAt", "hostname"}


def test_register_runner_timestamps_not_overridable(runner_api):
    forged = "2000-01-01T00:00:00.000Z"
    status, body = runner_api.post(
        "runners", {"runnerId": "pod-2", "registeredAt": forged, "heartbeatAt": forged, "version": "1.2"}
    )
    assert status == 201
    assert body["registeredAt"] != forged and body["heartbeatAt"] != forged
    assert ISO_MS.match(body["registeredAt"])
    assert body["version"] == "1.2"
    assert Runner.objects.get(pk="pod-2").registered_at.year != 2000


def test_register_runner_bad_runner_id_is_400(runner_api):
    assert_error(*runner_api.post("runners", {"runnerId": 5}), 400, "schema-invalid")


# --- runner jobs -------------------------------------------------------------------------------


def job_body(**overrides):
    body = {
        "commandId": "cmd_1",
        "payloadHash": "h1",
        "attemptId": "a1",
        "runnerId": "runner-1",
        "namespace": "ns",
        "jobName": "job-1",
        "managerUrl": "http://mgr",
        "image": "img:1",
        "sourceCommit": "abc",
        "result": {"exitCode": 0, "token": "kept-as-sent"},
    }
    body.update(overrides)
    return body


def test_runner_job_create_201_shape(runner_api):
    run = make_run()
    status, body = runner_api.post(f"runs/{run.id}/runner-jobs", job_body())
    assert status == 201, body
    assert set(body) == JOB_KEYS
    assert body["id"].startswith("rjob") and body["runId"] == run.id
    assert body["idempotencyKey"] is None and body["serviceAccountName"] is None
    assert body["result"] == {"exitCode": 0, "token": "kept-as-sent"}
    assert ISO_MS.match(body["createdAt"]) and ISO_MS.match(body["updatedAt"])


def test_runner_job_idempotent_replay_and_conflict(runner_api):
    run = make_run()
    status1, first = runner_api.post(f"runs/{run.id}/runner-jobs", job_body(idempotencyKey="ik"))
    status2, second = runner_api.post(f"runs/{run.id}/runner-jobs", job_body(idempotencyKey="ik", jobName="other"))
    assert (status1, status2) == (201, 200)
    assert second == first
    assert_error(
        *runner_api.post(f"runs/{run.id}/runner-jobs", job_body(idempotencyKey="ik", payloadHash="h2")),
        409,
        "schema-invalid",
    )
    assert RunnerJob.objects.filter(run_id=run.id).count() == 1


@pytest.mark.parametrize(
    "missing",
    [
        "commandId",
        "payloadHash",
        "attemptId",
        "runnerId",
        "namespace",
        "jobName",
        "managerUrl",
        "image",
        "sourceCommit",
    ],
)
def test_runner_job_missing_required_field_is_400(runner_api, missing):
    run = make_run()
    body = job_body()
    del body[missing]
    assert_error(*runner_api.post(f"runs/{run.id}/runner-jobs", body), 400, "schema-invalid")
    assert not RunnerJob.objects.exists()


def test_runner_job_list_ordered_by_created_at_with_command_filter(runner_api):
    run = make_run()
    ids = []
    for name, command in (("j1", "cmd_a"), ("j2", "cmd_b"), ("j3", "cmd_a")):
        ids.append(runner_api.post(f"runs/{run.id}/runner-jobs", job_body(jobName=name, commandId=command))[1]["id"])
    base = RunnerJob.objects.get(pk=ids[0]).created_at
    # Make createdAt disagree with insertion and id order: j3 oldest, then j1, then j2.
    for job_id, offset in zip(ids, (2, 3, 1), strict=True):
        RunnerJob.objects.filter(pk=job_id).update(created_at=base + timedelta(seconds=offset))
    status, page = runner_api.get(f"runs/{run.id}/runner-jobs")
    assert status == 200
    assert {"items", "count"} <= set(page)
    assert [j["jobName"] for j in page["items"]] == ["j3", "j1", "j2"]
    assert page["count"] == 3
    status, page = runner_api.get(f"runs/{run.id}/runner-jobs", commandId="cmd_a")
    assert [j["jobName"] for j in page["items"]] == ["j3", "j1"]
    status, page = runner_api.get(f"runs/{run.id}/runner-jobs", commandId="cmd_none")
    assert page["items"] == [] and page["count"] == 0


def test_runner_job_of_missing_run_is_404(runner_api):
    assert_error(*runner_api.post("runs/run_nope/runner-jobs", job_body()), 404, "schema-invalid")
    assert_error(*runner_api.get("runs/run_nope/runner-jobs"), 404, "schema-invalid")
