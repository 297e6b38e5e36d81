"""HTTP tests for commands: create, list, get, ack, finish, cancel."""

from __future__ import annotations

import re

import pytest

from runs import services
from runs.models import Command, Run
from sessions.models import Session
from tests.helpers import assert_error, claim, events_of, make_run, phases

pytestmark = pytest.mark.django_db


ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
COMMAND_KEYS = {
    "id",
    "runId",
    "seq",
    "type",
    "payload",
    "idempotencyKey",
    "payloadHash",
    "state",
    "acknowledgedAt",
    "terminalStatus",
    "failureKind",
    "failureMessage",
    "threadId",
    "turnId",
    "createdAt",
    "updatedAt",
}


def claimed_run(runner_id="runner-1", times=1, **kwargs):
    run = make_run(**kwargs)
    for _ in range(times):
        run = claim(run, runner_id=runner_id)
    return run


def new_command(run, command_type="turn", payload=None, **kwargs):
    command, _ = services.command_create(
        run_id=run.id, command_type=command_type, payload=payload if payload is not None else {"prompt": "hi"}, **kwargs
    )
    return command


def command_snapshot(command_id):
    command = Command.objects.get(pk=command_id)
    return (
        command.state,
        command.acknowledged_at,
        command.terminal_status,
        command.thread_id,
        command.updated_at,
        len(events_of(command.run_id)),
    )


def lease(epoch=1, runner_id="runner-1", **extra):
    return {"runnerId": runner_id, "leaseEpoch": epoch, **extra}


# --- create ------------------------------------------------------------------------------------


def test_create_command_201_shape_and_event(client_api):
    run = make_run()
    status, body = client_api.post(f"runs/{run.id}/commands", {"type": "turn", "payload": {"prompt": "go"}})
    assert status == 201, body
    assert set(body) == COMMAND_KEYS
    assert body["id"].startswith("cmd") and body["runId"] == run.id and body["seq"] == 1
    assert body["type"] == "turn" and body["payload"] == {"prompt": "go"}
    assert body["state"] == "pending" and body["acknowledgedAt"] is None and body["idempotencyKey"] is None
    assert re.fullmatch(r"[0-9a-f]{64}", body["payloadHash"])
    assert ISO_MS.match(body["createdAt"]) and ISO_MS.match(body["updatedAt"])
    last = events_of(run.id)[-1]
    assert last.type == "backend_status"
    assert last.payload == {"phase": "command-created", "commandId": body["id"], "commandType": "turn"}
    assert client_api.post(f"runs/{run.id}/commands", {"type": "turn", "payload": {}})[1]["seq"] == 2


def test_command_payload_is_stored_as_sent(client_api):
    run = make_run()
    payload = {"prompt": "use ghp_" + "a" * 36, "apiKey": "x"}
    status, body = client_api.post(f"runs/{run.id}/commands", {"type": "turn", "payload": payload})
    assert status == 201 and body["payload"] == payload
    assert Command.objects.get(pk=body["id"]).payload == payload


def test_create_command_replay_same_key_is_200_same_record(client_api):
    run = make_run()
    body = {"type": "turn", "payload": {"prompt": "x"}, "idempotencyKey": "ik-1"}
    status1, first = client_api.post(f"runs/{run.id}/commands", body)
    events = len(events_of(run.id))
    status2, second = client_api.post(f"runs/{run.id}/commands", body)
    assert (status1, status2) == (201, 200)
    assert second == first and second["idempotencyKey"] == "ik-1"
    assert len(events_of(run.id)) == events
    assert Command.objects.filter(run_id=run.id).count() == 1


@pytest.mark.parametrize(
    "other", [{"type": "turn", "payload": {"prompt": "y"}}, {"type": "steer", "payload": {"prompt": "x"}}]
)
def test_create_command_same_key_other_command_is_409(client_api, other):
    run = make_run()
    client_api.post(f"runs/{run.id}/commands", {"type": "turn", "payload": {"prompt": "x"}, "idempotencyKey": "ik"})
    assert_error(*client_api.post(f"runs/{run.id}/commands", {**other, "idempotencyKey": "ik"}), 409, "schema-invalid")
    assert Command.objects.filter(run_id=run.id).count() == 1


def test_create_command_replay_after_run_terminal_returns_original(client_api):
    run = make_run()
    body = {"type": "turn", "payload": {"prompt": "x"}, "idempotencyKey": "ik-a6"}
    _, first = client_api.post(f"runs/{run.id}/commands", body)
    client_api.post(f"runs/{run.id}/cancel")
    status, again = client_api.post(f"runs/{run.id}/commands", body)
    assert status == 200, again
    assert again["id"] == first["id"] and again["state"] == "cancelled"


@pytest.mark.parametrize(
    ("terminal_status", "failure_kind", "kind"),
    [
        ("failed", "agent-failed", "agent-failed"),
        ("timeout", "timeout", "timeout"),
        ("completed", None, "schema-invalid"),
    ],
)
def test_create_command_on_finished_run_is_409_failure_kind(client_api, terminal_status, failure_kind, kind):
    run = claimed_run()
    services.run_finish(
        run_id=run.id, runner_id="runner-1", lease_epoch=1, terminal_status=terminal_status, failure_kind=failure_kind
    )
    assert_error(*client_api.post(f"runs/{run.id}/commands", {"type": "turn", "payload": {}}), 409, kind)
    assert not Command.objects.filter(run_id=run.id).exists()


def test_create_command_on_cancelled_run_is_409_cancelled(client_api):
    run = make_run()
    services.run_cancel(run_id=run.id)
    assert_error(*client_api.post(f"runs/{run.id}/commands", {"type": "turn", "payload": {}}), 409, "cancelled")


@pytest.mark.parametrize("backend", ["codex", "claude-code"])
def test_steer_to_backend_without_steer_is_400(client_api, backend):
    run = make_run(backend=backend)
    assert_error(
        *client_api.post(f"runs/{run.id}/commands", {"type": "steer", "payload": {"text": "s"}}), 400, "schema-invalid"
    )
    assert not Command.objects.filter(run_id=run.id).exists()
    assert client_api.post(f"runs/{run.id}/commands", {"type": "turn", "payload": {}})[0] == 201


def test_steer_to_echo_is_201(client_api):
    run = make_run(backend="echo")
    status, body = client_api.post(f"runs/{run.id}/commands", {"type": "steer", "payload": {"text": "s"}})
    assert status == 201 and body["type"] == "steer"


@pytest.mark.parametrize(
    "body",
    [
        {"type": "explode", "payload": {}},
        {"payload": {}},
        {"type": 3},
        {"type": "turn", "payload": [1]},
        {"type": "turn", "payload": "p"},
    ],
)
def test_create_command_bad_input_is_400(client_api, body):
    run = make_run()
    assert_error(*client_api.post(f"runs/{run.id}/commands", body), 400, "schema-invalid")
    assert not Command.objects.filter(run_id=run.id).exists()


def test_create_command_on_missing_run_is_404(client_api):
    assert_error(*client_api.post("runs/run_x/commands", {"type": "turn", "payload": {}}), 404, "schema-invalid")


# --- list and get ------------------------------------------------------------------------------


def test_list_commands_page(client_api, runner_api):
    run = make_run()
    ids = [new_command(run, payload={"prompt": str(i)}).id for i in range(3)]
    for api in (client_api, runner_api):
        status, page = api.get(f"runs/{run.id}/commands")
        assert status == 200
        assert set(page) == {"items", "count", "cursor"}
        assert [c["id"] for c in page["items"]] == ids and page["count"] == 3 and page["cursor"] == "3"
        assert all(set(c) == COMMAND_KEYS for c in page["items"])
    status, page = client_api.get(f"runs/{run.id}/commands", afterSeq=1, limit=1)
    assert [c["seq"] for c in page["items"]] == [2] and page["cursor"] == "2"


def test_list_commands_empty_page_cursor(client_api):
    run = make_run()
    assert client_api.get(f"runs/{run.id}/commands") == (200, {"items": [], "count": 0, "cursor": "0"})
    assert client_api.get(f"runs/{run.id}/commands", afterSeq=9) == (200, {"items": [], "count": 0, "cursor": "9"})
    assert client_api.get(f"runs/{run.id}/commands", afterSeq=4, wait="0.01") == (
        200,
        {"items": [], "count": 0, "cursor": "4"},
    )


def test_list_commands_limit_clamps_to_100(client_api):
    run = make_run()
    for i in range(101):
        new_command(run, command_type="steer", payload={"i": i})
    status, page = client_api.get(f"runs/{run.id}/commands", limit=10000)
    assert status == 200 and page["count"] == 100 and page["cursor"] == "100"


def test_get_command(client_api, runner_api):
    run = make_run()
    command = new_command(run)
    for api in (client_api, runner_api):
        status, body = api.get(f"commands/{command.id}")
        assert status == 200 and set(body) == COMMAND_KEYS and body["id"] == command.id


def test_get_missing_command_is_404(client_api):
    assert_error(*client_api.get("commands/cmd_missing"), 404, "schema-invalid")


# --- ack ---------------------------------------------------------------------------------------


def test_ack_command(runner_api):
    run = claimed_run()
    command = new_command(run)
    events = len(events_of(run.id))
    status, body = runner_api.post(f"commands/{command.id}/ack", lease())
    assert status == 200, body
    assert set(body) == COMMAND_KEYS
    assert body["state"] == "acknowledged" and ISO_MS.match(body["acknowledgedAt"])
    status, again = runner_api.post(f"commands/{command.id}/ack", lease())
    assert status == 200 and again == body
    assert len(events_of(run.id)) == events


@pytest.mark.parametrize(("runner_id", "epoch"), [("runner-1", 1), ("runner-2", 2), ("runner-1", 9)])
def test_ack_stale_epoch_or_other_runner_is_409_and_writes_nothing(runner_api, runner_id, epoch):
    run = claimed_run(times=2)
    command = new_command(run)
    before = command_snapshot(command.id)
    assert_error(*runner_api.post(f"commands/{command.id}/ack", lease(epoch, runner_id)), 409, "runner-lease-conflict")
    assert command_snapshot(command.id) == before


def test_ack_terminal_command_returns_it_unchanged_whatever_the_epoch(runner_api, client_api):
    run = claimed_run()
    command = new_command(run)
    _, cancelled = client_api.post(f"commands/{command.id}/cancel")
    before = command_snapshot(command.id)
    status, body = runner_api.post(f"commands/{command.id}/ack", lease(55, "someone"))
    assert status == 200 and body == cancelled
    assert command_snapshot(command.id) == before


def test_ack_missing_command_is_404(runner_api):
    assert_error(*runner_api.post("commands/cmd_none/ack", lease()), 404, "schema-invalid")


# --- finish ------------------------------------------------------------------------------------


def test_finish_command_completed(runner_api):
    run = claimed_run()
    command = new_command(run)
    status, body = runner_api.post(f"commands/{command.id}/finish", lease(terminalStatus="completed"))
    assert status == 200, body
    assert body["state"] == "completed" and body["terminalStatus"] == "completed"
    event = events_of(run.id)[-1]
    assert event.payload == {
        "phase": "command-terminal",
        "commandId": command.id,
        "state": "completed",
        "terminalStatus": "completed",
        "failureKind": None,
        "message": None,
        "threadId": None,
        "turnId": None,
    }
    assert Run.objects.get(pk=run.id).status == "claimed"


@pytest.mark.parametrize(
    ("terminal_status", "state"),
    [("failed", "failed"), ("blocked", "failed"), ("timeout", "failed"), ("cancelled", "cancelled")],
)
def test_finish_command_maps_state(runner_api, terminal_status, state):
    run = claimed_run()
    command = new_command(run)
    status, body = runner_api.post(
        f"commands/{command.id}/finish",
        lease(terminalStatus=terminal_status, failureKind="agent-failed", failureMessage="boom"),
    )
    assert status == 200
    assert body["state"] == state and body["failureKind"] == "agent-failed" and body["failureMessage"] == "boom"
    assert events_of(run.id)[-1].payload["message"] == "boom"


def test_finish_command_with_thread_emits_session_updated_then_command_terminal(runner_api):
    run = make_run(session_id="sess-cmd")
    claim(run)
    command = new_command(run)
    start = len(events_of(run.id))
    status, body = runner_api.post(
        f"commands/{command.id}/finish", lease(terminalStatus="completed", threadId="th-9", turnId="tu-9")
    )
    assert status == 200, body
    assert body["threadId"] == "th-9" and body["turnId"] == "tu-9"
    new = events_of(run.id)[start:]
    assert [(e.type, e.payload.get("phase")) for e in new] == [
        ("backend_status", "session-updated"),
        ("backend_status", "command-terminal"),
    ]
    assert set(new[0].payload) == {"phase", "sessionRef", "turnId"}
    assert new[0].payload["sessionRef"]["threadId"] == "th-9" and new[0].payload["turnId"] == "tu-9"
    assert new[1].payload["threadId"] == "th-9" and new[1].payload["turnId"] == "tu-9"
    session = Session.objects.get(pk="sess-cmd")
    assert session.thread_id == "th-9" and session.metadata.get("lastTurnId") == "tu-9"
    assert session.execution_state == "terminal"
    assert Run.objects.get(pk=run.id).session_ref["threadId"] == "th-9"


@pytest.mark.parametrize(("runner_id", "epoch"), [("runner-1", 1), ("runner-2", 2)])
def test_finish_command_stale_epoch_is_409_and_writes_nothing(runner_api, runner_id, epoch):
    run = claimed_run(times=2, session_id="sess-stale")
    command = new_command(run)
    before = command_snapshot(command.id)
    session_before = Session.objects.get(pk="sess-stale").version
    assert_error(
        *runner_api.post(
            f"commands/{command.id}/finish", lease(epoch, runner_id, terminalStatus="completed", threadId="t")
        ),
        409,
        "runner-lease-conflict",
    )
    assert command_snapshot(command.id) == before
    assert Session.objects.get(pk="sess-stale").version == session_before


def test_finish_terminal_command_returns_it_unchanged_whatever_the_epoch(runner_api):
    run = claimed_run()
    command = new_command(run)
    _, first = runner_api.post(f"commands/{command.id}/finish", lease(terminalStatus="failed"))
    before = command_snapshot(command.id)
    status, body = runner_api.post(f"commands/{command.id}/finish", lease(33, "r-x", terminalStatus="completed"))
    assert status == 200 and body == first and body["state"] == "failed"
    assert command_snapshot(command.id) == before


def test_finish_command_unknown_terminal_status_is_400(runner_api):
    run = claimed_run()
    command = new_command(run)
    before = command_snapshot(command.id)
    assert_error(
        *runner_api.post(f"commands/{command.id}/finish", lease(terminalStatus="finished")), 400, "schema-invalid"
    )
    assert_error(*runner_api.post(f"commands/{command.id}/finish", lease()), 400, "schema-invalid")
    assert command_snapshot(command.id) == before


# --- cancel ------------------------------------------------------------------------------------


def test_cancel_turn_command(client_api):
    run = claimed_run(session_id="sess-cancel")
    command = new_command(run)
    assert Session.objects.get(pk="sess-cancel").execution_state == "running"
    status, body = client_api.post(f"commands/{command.id}/cancel", {"reason": "nevermind"})
    assert status == 200, body
    assert body["state"] == "cancelled" and body["terminalStatus"] == "cancelled"
    assert body["failureKind"] == "cancelled"
    assert events_of(run.id)[-1].payload == {
        "phase": "command-terminal",
        "commandId": command.id,
        "state": "cancelled",
        "terminalStatus": "cancelled",
        "failureKind": "cancelled",
        "message": "nevermind",
    }
    session = Session.objects.get(pk="sess-cancel")
    assert session.execution_state == "terminal" and session.active_command_id is None
    assert Run.objects.get(pk=run.id).status == "claimed"


def test_cancel_command_default_reason_and_repeat_unchanged(client_api):
    run = make_run()
    command = new_command(run, command_type="steer", payload={})
    status, first = client_api.post(f"commands/{command.id}/cancel")
    assert status == 200
    assert events_of(run.id)[-1].payload["message"] == "cancel requested"
    before = command_snapshot(command.id)
    status, again = client_api.post(f"commands/{command.id}/cancel", {"reason": "again"})
    assert status == 200 and again == first
    assert command_snapshot(command.id) == before
    assert phases(run.id)[-1] == ("backend_status", "command-terminal")


def test_cancel_missing_command_is_404(client_api):
    assert_error(*client_api.post("commands/cmd_gone/cancel"), 404, "schema-invalid")
