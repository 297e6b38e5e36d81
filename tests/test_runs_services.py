"""Service-level behaviour of runs, commands, events, runners and runner jobs (SPEC §3.1-3.4, §5, §7)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection, transaction

from agentrun.auth import Scope
from agentrun.errors import AgentRunError
from runs import selectors, services
from runs.models import Command, EventBatch, Run, RunEvent, RunnerJob
from sessions.models import Session
from tests.helpers import PROJECT, TENANT, claim, events_of, make_run, phases

pytestmark = pytest.mark.django_db


def error_of(call, *args, **kwargs) -> AgentRunError:
    with pytest.raises(AgentRunError) as caught:
        call(*args, **kwargs)
    return caught.value


def db_clock():
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]


def finish(run, *, epoch=None, runner_id="runner-1", status="completed", **kwargs):
    return services.run_finish(
        run_id=run.id,
        runner_id=runner_id,
        lease_epoch=epoch if epoch is not None else run.lease_epoch,
        terminal_status=status,
        **kwargs,
    )


def add_command(run, command_type="turn", payload=None, key=None):
    command, _ = services.command_create(
        run_id=run.id, command_type=command_type, payload=payload or {"prompt": "hi"}, idempotency_key=key
    )
    return command


# --- createRun ---------------------------------------------------------------------------


def test_create_run_defaults_and_run_created_event():
    run = make_run(session_id="s1", resource_bundle_ref={"kind": "git", "repoUrl": "https://x/r", "bundles": []})
    assert run.id.startswith("run_")
    assert run.status == "pending"
    assert (run.claimed_by, run.lease_expires_at, run.lease_epoch) == (None, None, 0)
    [event] = events_of(run.id)
    assert event.seq == 1 and event.type == "backend_status"
    assert set(event.payload) == {"phase", "backendProfile", "sessionRef", "resourceBundleRef"}
    assert event.payload["phase"] == "run-created"
    assert event.payload["sessionRef"] == {
        "sessionId": "s1",
        "conversationId": None,
        "threadId": None,
        "expiresAt": None,
        "metadataKeys": [],
        "valuesPrinted": False,
    }
    assert event.payload["resourceBundleRef"]["bundles"] == {"count": 0, "items": [], "valuesPrinted": False}


def test_create_run_without_session_has_null_refs():
    run = make_run()
    assert run.session_ref is None and run.resource_bundle_ref is None
    [event] = events_of(run.id)
    assert event.payload["sessionRef"] is None and event.payload["resourceBundleRef"] is None


def test_create_run_makes_new_session_from_ref():
    run = make_run(
        session_ref={
            "sessionId": "s2",
            "conversationId": "c1",
            "metadata": {"title": "  Fix  it ", "k": 1},
            "expiresAt": "2030-01-01T00:00:00Z",
        }
    )
    session = Session.objects.get(pk="s2")
    assert (session.tenant_id, session.project_id, session.backend_profile) == (TENANT, PROJECT, "echo")
    assert session.conversation_id == "c1" and session.title == "Fix  it"
    assert session.execution_state == "idle" and session.last_run_id == run.id
    assert session.storage_kind == "none" and session.version > 0
    assert run.session_ref == {
        "sessionId": "s2",
        "conversationId": "c1",
        "expiresAt": "2030-01-01T00:00:00.000Z",
        "metadata": {"title": "  Fix  it ", "k": 1},
    }


def test_create_run_on_existing_session_does_not_rewrite_it_or_bump_version():
    make_run(session_ref={"sessionId": "s3", "metadata": {"a": 1}})
    before = Session.objects.get(pk="s3")
    second = make_run(session_ref={"sessionId": "s3", "threadId": "t-new", "metadata": {"b": 2}})
    after = Session.objects.get(pk="s3")
    assert after.version == before.version
    assert after.metadata == {"a": 1} and after.thread_id is None
    assert after.last_run_id == second.id
    # The ref is built from the record, gaps filled from the input ref (SPEC §4.8).
    assert second.session_ref == {"sessionId": "s3", "threadId": "t-new", "metadata": {"a": 1}}


def test_session_boundary_other_tenant_is_403_and_creates_nothing():
    make_run(session_id="s4")
    runs_before = Run.objects.count()
    error = error_of(make_run, tenant="other", session_id="s4")
    assert (error.kind, error.status) == ("tenant-policy-denied", 403)
    assert error.details == {"sessionId": "s4", "valuesPrinted": False}
    assert Run.objects.count() == runs_before


def test_session_boundary_other_project_is_403():
    make_run(session_id="s5")
    error = error_of(make_run, project="other", session_id="s5")
    assert (error.kind, error.status) == ("tenant-policy-denied", 403)


def test_session_boundary_other_backend_is_400_after_tenant_check():
    make_run(session_id="s6")
    error = error_of(make_run, backend="codex", session_id="s6")
    assert (error.kind, error.status) == ("schema-invalid", 400)
    assert error.details == {
        "sessionId": "s6",
        "existingBackendProfile": "echo",
        "requestedBackendProfile": "codex",
        "valuesPrinted": False,
    }
    # Tenant first: another tenant and another backend is still 403.
    assert error_of(make_run, tenant="other", backend="codex", session_id="s6").status == 403


def test_create_run_rejects_unknown_backend_and_bad_refs():
    assert error_of(make_run, backend="gpt").status == 400
    assert error_of(make_run, session_ref={"sessionId": ""}).status == 400
    assert error_of(make_run, session_ref={"sessionId": "x", "expiresAt": "not a time"}).status == 400
    assert error_of(make_run, resource_bundle_ref={"kind": "git"}).status == 400
    assert Run.objects.count() == 0 and Session.objects.count() == 0


def test_create_run_idempotency_key_replays_and_conflicts():
    first, created = services.run_create(
        tenant_id=TENANT, project_id=PROJECT, backend_profile="echo", idempotency_key="k1", metadata={"a": 1}
    )
    again, created_again = services.run_create(
        tenant_id=TENANT, project_id=PROJECT, backend_profile="echo", idempotency_key="k1", metadata={"a": 1}
    )
    assert created and not created_again and again.id == first.id
    error = error_of(
        services.run_create,
        tenant_id=TENANT,
        project_id=PROJECT,
        backend_profile="echo",
        idempotency_key="k1",
        metadata={"a": 2},
    )
    assert (error.kind, error.status) == ("schema-invalid", 409)
    assert Run.objects.count() == 1 and len(events_of(first.id)) == 1


def test_resource_bundle_summary_prints_names_not_values():
    ref = {
        "kind": "git",
        "repoUrl": "https://git/r",
        "commitId": "abc",
        "bundles": [
            {"name": "b", "subpath": "s", "targetPath": "t"},
            {"repoUrl": "https://git/o", "ref": "main", "subpath": "s2", "targetPath": "t2"},
        ],
        "promptRefs": [{"name": "p1", "required": True}, {"name": "p2"}],
        "credentialRef": {"name": "cred", "keys": ["token"]},
        "lfs": True,
    }
    summary = services.summarize_resource_bundle_ref(ref)
    assert summary["bundles"]["items"][0] == {
        "name": "b",
        "repoUrl": "https://git/r",
        "commitId": "abc",
        "ref": None,
        "subpath": "s",
        "targetPath": "t",
        "valuesPrinted": False,
    }
    assert summary["bundles"]["items"][1]["repoUrl"] == "https://git/o"
    assert summary["bundles"]["items"][1]["ref"] == "main"
    assert summary["promptRefs"] == {"count": 2, "names": ["p1", "p2"], "required": ["p1"], "valuesPrinted": False}
    assert summary["requiredSkills"] == {"count": 0, "names": [], "valuesPrinted": False}
    assert summary["credentialRef"] == {"name": "cred", "namespace": None, "keys": ["token"], "valuesPrinted": False}
    assert (summary["submodules"], summary["lfs"]) == (False, True)
    assert "valuesPrinted" not in summary


# --- claim, heartbeat, leases -------------------------------------------------------------


def test_claim_sets_lease_on_the_database_clock_and_bumps_epoch():
    run = make_run(session_id="c1")
    before = db_clock()
    claimed = claim(run, lease_ms=30_000)
    after = db_clock()
    assert claimed.status == "claimed" and claimed.claimed_by == "runner-1" and claimed.lease_epoch == 1
    assert before <= claimed.lease_expires_at - timedelta(milliseconds=30_000) <= after
    again = claim(run, lease_ms=30_000)
    assert again.lease_epoch == 2
    assert [p for _, p in phases(run.id)] == ["run-created", "run-claimed", "run-claimed"]
    assert events_of(run.id)[1].payload == {"phase": "run-claimed", "runnerId": "runner-1"}


def test_claim_does_not_make_session_active_but_points_at_run():
    run = make_run(session_id="c2")
    version = Session.objects.get(pk="c2").version
    claim(run)
    session = Session.objects.get(pk="c2")
    assert session.execution_state == "idle" and not session.active
    assert session.active_run_id == run.id and session.version == version


def test_claim_conflicts_with_live_lease_of_another_runner():
    run = make_run()
    claim(run, runner_id="a")
    error = error_of(claim, run, runner_id="b")
    assert (error.kind, error.status) == ("runner-lease-conflict", 409)


def test_lapsed_lease_can_be_taken_over_and_fences_the_old_holder():
    run = make_run()
    first = claim(run, runner_id="a")
    Run.objects.filter(pk=run.id).update(lease_expires_at=first.lease_expires_at - timedelta(hours=1))
    second = claim(run, runner_id="b")
    assert second.claimed_by == "b" and second.lease_epoch == 2
    error = error_of(services.run_heartbeat, run_id=run.id, runner_id="a", lease_epoch=1, lease_ms=1000)
    assert error.kind == "runner-lease-conflict"


def test_claim_terminal_run_uses_failure_kind_rule():
    cancelled = make_run()
    services.run_cancel(run_id=cancelled.id)
    assert (error_of(claim, cancelled).kind, error_of(claim, cancelled).status) == ("cancelled", 409)
    failed = claim(make_run())
    finish(failed, status="failed", failure_kind="agent-failed")
    assert error_of(claim, failed).kind == "agent-failed"
    done = claim(make_run())
    finish(done)
    assert error_of(claim, done).kind == "schema-invalid"


def test_heartbeat_renews_only_for_holder_at_epoch():
    run = claim(make_run(), lease_ms=1000)
    renewed = services.run_heartbeat(run_id=run.id, runner_id="runner-1", lease_epoch=1, lease_ms=90_000)
    assert renewed.lease_expires_at > run.lease_expires_at
    count = len(events_of(run.id))
    assert error_of(services.run_heartbeat, run_id=run.id, runner_id="x", lease_epoch=1, lease_ms=1).status == 409
    assert (
        error_of(services.run_heartbeat, run_id=run.id, runner_id="runner-1", lease_epoch=0, lease_ms=1).status == 409
    )
    assert len(events_of(run.id)) == count  # heartbeats emit nothing


def test_heartbeat_on_unclaimed_run_conflicts_and_on_terminal_run_is_a_no_op():
    run = make_run()
    assert error_of(services.run_heartbeat, run_id=run.id, runner_id="a", lease_epoch=0, lease_ms=1).status == 409
    services.run_cancel(run_id=run.id)
    same = services.run_heartbeat(run_id=run.id, runner_id="anyone", lease_epoch=99, lease_ms=1)
    assert same.status == "cancelled"


def test_unknown_run_is_404_everywhere():
    for call in (
        lambda: services.run_claim(run_id="run_x", runner_id="a", lease_ms=1),
        lambda: services.run_heartbeat(run_id="run_x", runner_id="a", lease_epoch=0, lease_ms=1),
        lambda: services.run_cancel(run_id="run_x"),
        lambda: services.command_create(run_id="run_x", command_type="turn", payload={}),
        lambda: services.event_append(run_id="run_x", runner_id="a", lease_epoch=0, events=[("error", {})]),
        lambda: selectors.run_get(run_id="run_x"),
        lambda: services.command_ack(command_id="cmd_x", runner_id="a", lease_epoch=0),
    ):
        error = error_of(call)
        assert (error.kind, error.status) == ("schema-invalid", 404)


def test_scope_hides_other_tenants_runs():
    run = make_run()
    assert error_of(selectors.run_get, run_id=run.id, scope=Scope(tenant_id="other")).status == 404
    assert error_of(services.run_cancel, run_id=run.id, scope=Scope(tenant_id=TENANT, project_id="p2")).status == 404
    assert (
        error_of(
            services.run_claim,
            run_id=run.id,
            runner_id="a",
            lease_ms=1,
            scope=Scope(tenant_id=TENANT, run_id="run_other"),
        ).status
        == 404
    )
    assert (
        selectors.run_get(run_id=run.id, scope=Scope(tenant_id=TENANT, project_id=PROJECT, run_id=run.id)).id == run.id
    )


# --- events ------------------------------------------------------------------------------


def test_append_batch_is_gapless_and_redacted_and_touches_session():
    run = claim(make_run(session_id="e1"))
    events, created = services.event_append(
        run_id=run.id,
        runner_id="runner-1",
        lease_epoch=1,
        events=[("assistant_message", {"text": "a", "apiKey": "x"}), ("usage", {"inputTokens": 5})],
    )
    assert created and [e.seq for e in events] == [3, 4]
    stored = events_of(run.id)
    assert [e.seq for e in stored] == [1, 2, 3, 4]
    assert stored[2].payload == {"text": "a", "apiKey": "[REDACTED]", "redactedPaths": ["/apiKey"]}
    assert stored[3].payload == {"inputTokens": 5}
    session = Session.objects.get(pk="e1")
    assert session.last_event_seq == 4 and session.last_activity_at == stored[3].created_at


def test_append_with_bad_event_writes_nothing():
    run = claim(make_run())
    error = error_of(
        services.event_append,
        run_id=run.id,
        runner_id="runner-1",
        lease_epoch=1,
        events=[("assistant_message", {}), ("nonsense", {})],
    )
    assert (error.kind, error.status) == ("schema-invalid", 400)
    assert len(events_of(run.id)) == 2
    assert Run.objects.get(pk=run.id).last_event_seq == 2


def test_append_is_fenced_by_holder_and_epoch():
    run = claim(make_run())
    claim(run)  # epoch 2
    before = len(events_of(run.id))
    error = error_of(services.event_append, run_id=run.id, runner_id="runner-1", lease_epoch=1, events=[("error", {})])
    assert error.kind == "runner-lease-conflict"
    assert (
        error_of(services.event_append, run_id=run.id, runner_id="other", lease_epoch=2, events=[("error", {})]).kind
        == "runner-lease-conflict"
    )
    assert len(events_of(run.id)) == before


def test_late_flush_after_finish_only_with_last_epoch():
    run = claim(claim(make_run()))
    finish(run, epoch=2)
    events, _ = services.event_append(run_id=run.id, runner_id="runner-1", lease_epoch=2, events=[("error", {"m": 1})])
    assert events[0].seq == len(events_of(run.id))
    assert (
        error_of(
            services.event_append, run_id=run.id, runner_id="runner-1", lease_epoch=1, events=[("error", {})]
        ).status
        == 409
    )


def test_batch_key_replays_and_conflicts():
    run = claim(make_run())
    batch = [("assistant_message", {"text": "x"})]
    first, created = services.event_append(
        run_id=run.id, runner_id="runner-1", lease_epoch=1, events=batch, batch_key="b1"
    )
    again, created_again = services.event_append(
        run_id=run.id, runner_id="runner-1", lease_epoch=1, events=batch, batch_key="b1"
    )
    assert created and not created_again
    assert [e.id for e in again] == [e.id for e in first]
    error = error_of(
        services.event_append,
        run_id=run.id,
        runner_id="runner-1",
        lease_epoch=1,
        events=[("assistant_message", {"text": "y"})],
        batch_key="b1",
    )
    assert (error.kind, error.status) == ("schema-invalid", 409)
    assert len(events_of(run.id)) == 3 and EventBatch.objects.count() == 1


def test_output_filter_in_sql_before_limit():
    run = claim(make_run())
    services.event_append(
        run_id=run.id,
        runner_id="runner-1",
        lease_epoch=1,
        events=[("reasoning", {})] * 5 + [("assistant_message", {"text": "x"})],
    )
    page = selectors.event_list(run_id=run.id, after_seq=0, limit=2, types=["assistant_message"])
    assert [e.type for e in page] == ["assistant_message"]


# --- commands ----------------------------------------------------------------------------


def test_turn_command_makes_session_running_with_title_and_bump():
    run = make_run(session_id="t1")
    version = Session.objects.get(pk="t1").version
    command = add_command(run, payload={"prompt": "  Fix\n\tthe   build  "})
    assert command.seq == 1 and command.state == "pending" and command.acknowledged_at is None
    session = Session.objects.get(pk="t1")
    assert session.execution_state == "running" and session.active
    assert session.active_run_id == run.id and session.active_command_id == command.id
    assert session.title == "Fix the build" and session.version > version
    assert events_of(run.id)[-1].payload == {"phase": "command-created", "commandId": command.id, "commandType": "turn"}


def test_turn_without_prompt_keeps_title():
    run = make_run(session_id="t2")
    add_command(run, payload={"prompt": "first"})
    add_command(run, payload={"other": 1})
    assert Session.objects.get(pk="t2").title == "first"


def test_title_from_prompt_is_cut_to_120_characters():
    run = make_run(session_id="t3")
    add_command(run, payload={"prompt": "x" * 300})
    assert Session.objects.get(pk="t3").title == "x" * 120


def test_steer_bumps_and_keeps_active_command():
    run = make_run(session_id="t4")
    turn = add_command(run)
    version = Session.objects.get(pk="t4").version
    steer = add_command(run, "steer", {"prompt": "also this"})
    session = Session.objects.get(pk="t4")
    assert session.active_command_id == turn.id and session.last_command_id == steer.id
    assert session.version > version and session.title == "hi"


def test_steer_to_backend_without_steer_is_400():
    run = make_run(backend="codex")
    error = error_of(add_command, run, "steer")
    assert (error.kind, error.status) == ("schema-invalid", 400)
    assert Command.objects.count() == 0


def test_unknown_command_type_or_payload_is_400():
    run = make_run()
    assert error_of(add_command, run, "dance").status == 400
    assert error_of(services.command_create, run_id=run.id, command_type="turn", payload=["x"]).status == 400


def test_command_idempotency_hash_covers_type_and_payload():
    run = make_run()
    first = add_command(run, key="k")
    again, created = services.command_create(
        run_id=run.id, command_type="turn", payload={"prompt": "hi"}, idempotency_key="k"
    )
    assert not created and again.id == first.id
    assert error_of(add_command, run, "steer", {"prompt": "hi"}, key="k").status == 409
    assert error_of(add_command, run, "turn", {"prompt": "other"}, key="k").status == 409
    # An empty key means no de-duplication.
    assert add_command(run, key="").id != add_command(run, key="").id


def test_command_replay_comes_before_terminal_check():
    run = make_run()
    first = add_command(run, key="k")
    services.run_cancel(run_id=run.id)
    again, created = services.command_create(
        run_id=run.id, command_type="turn", payload={"prompt": "hi"}, idempotency_key="k"
    )
    assert again.id == first.id and not created
    error = error_of(add_command, run, key="new")
    assert (error.kind, error.status) == ("cancelled", 409)


def test_ack_is_fenced_and_idempotent():
    run = claim(make_run())
    command = add_command(run)
    assert error_of(services.command_ack, command_id=command.id, runner_id="runner-1", lease_epoch=0).status == 409
    acked = services.command_ack(command_id=command.id, runner_id="runner-1", lease_epoch=1)
    assert acked.state == "acknowledged" and acked.acknowledged_at is not None
    again = services.command_ack(command_id=command.id, runner_id="runner-1", lease_epoch=1)
    assert again.acknowledged_at == acked.acknowledged_at


def test_finish_turn_with_thread_updates_session_and_orders_events():
    run = claim(make_run(session_ref={"sessionId": "f1", "metadata": {"k": "v"}}))
    Session.objects.filter(pk="f1").update(storage_kind="pvc", storage_pvc_name="pvc-1", codex_rollout_subdir="r")
    command = add_command(run)
    version = Session.objects.get(pk="f1").version
    done = services.command_finish(
        command_id=command.id,
        runner_id="runner-1",
        lease_epoch=1,
        terminal_status="completed",
        thread_id="th-1",
        turn_id="turn-1",
    )
    assert done.state == "completed" and done.thread_id == "th-1"
    tail = events_of(run.id)[-2:]
    assert tail[0].payload["phase"] == "session-updated"
    assert tail[0].payload["sessionRef"]["threadId"] == "th-1" and tail[0].payload["turnId"] == "turn-1"
    assert tail[1].payload == {
        "phase": "command-terminal",
        "commandId": command.id,
        "state": "completed",
        "terminalStatus": "completed",
        "failureKind": None,
        "message": None,
        "threadId": "th-1",
        "turnId": "turn-1",
    }
    session = Session.objects.get(pk="f1")
    assert session.thread_id == "th-1" and session.metadata == {"k": "v", "lastTurnId": "turn-1"}
    # A4: the thread update keeps storage fields.
    assert (session.storage_kind, session.storage_pvc_name, session.codex_rollout_subdir) == ("pvc", "pvc-1", "r")
    assert session.execution_state == "terminal" and session.active_command_id is None
    assert session.terminal_status == "completed" and session.version > version
    # The run's ref now carries the thread (A8).
    assert Run.objects.get(pk=run.id).session_ref["threadId"] == "th-1"


def test_blocked_terminal_status_maps_to_failed_command():
    run = claim(make_run(session_id="f2"))
    command = add_command(run)
    done = services.command_finish(
        command_id=command.id,
        runner_id="runner-1",
        lease_epoch=1,
        terminal_status="blocked",
        failure_kind="agent-failed",
    )
    assert done.state == "failed"
    assert Session.objects.get(pk="f2").terminal_status == "blocked"


def test_late_finish_of_old_turn_does_not_end_newer_turn():
    run = claim(make_run(session_id="f3"))
    old = add_command(run)
    new = add_command(run)
    services.command_finish(command_id=old.id, runner_id="runner-1", lease_epoch=1, terminal_status="completed")
    session = Session.objects.get(pk="f3")
    assert session.execution_state == "running" and session.active_command_id == new.id


def test_finish_terminal_command_is_a_no_op_whatever_the_epoch():
    run = claim(make_run())
    command = add_command(run)
    services.command_finish(command_id=command.id, runner_id="runner-1", lease_epoch=1, terminal_status="failed")
    count = len(events_of(run.id))
    same = services.command_finish(command_id=command.id, runner_id="x", lease_epoch=42, terminal_status="completed")
    assert same.state == "failed" and len(events_of(run.id)) == count


def test_cancel_command_emits_event_before_touch_and_keeps_run():
    run = claim(make_run(session_id="f4"))
    command = add_command(run)
    cancelled = services.command_cancel(command_id=command.id, reason="nope")
    assert cancelled.state == "cancelled"
    assert events_of(run.id)[-1].payload == {
        "phase": "command-terminal",
        "commandId": command.id,
        "state": "cancelled",
        "terminalStatus": "cancelled",
        "failureKind": "cancelled",
        "message": "nope",
    }
    assert Run.objects.get(pk=run.id).status == "claimed"
    session = Session.objects.get(pk="f4")
    assert session.execution_state == "terminal" and session.terminal_status == "cancelled"


def test_command_seq_is_per_run():
    a, b = make_run(), make_run()
    assert [add_command(a).seq, add_command(a).seq, add_command(b).seq] == [1, 2, 1]


# --- finish and cancel runs ----------------------------------------------------------------


def test_finish_run_cancels_open_commands_then_emits_terminal_status():
    run = claim(make_run(session_id="r1"))
    first, second = add_command(run), add_command(run, "steer")
    done = finish(run, status="failed", failure_kind="agent-failed", failure_message="boom")
    assert done.status == "failed" and done.terminal_status == "failed" and done.failure_message == "boom"
    assert done.claimed_by == "runner-1" and done.lease_expires_at is None
    tail = events_of(run.id)[-3:]
    assert [e.payload.get("commandId") for e in tail[:2]] == [first.id, second.id]
    assert tail[0].payload == {
        "phase": "command-terminal",
        "commandId": first.id,
        "state": "cancelled",
        "terminalStatus": "cancelled",
        "failureKind": "cancelled",
        "message": "run finished",
    }
    assert tail[2].type == "terminal_status"
    assert tail[2].payload == {"terminalStatus": "failed", "failureKind": "agent-failed", "message": "boom"}
    assert set(Command.objects.filter(run=run).values_list("state", flat=True)) == {"cancelled"}
    session = Session.objects.get(pk="r1")
    assert session.execution_state == "terminal" and session.active_run_id is None
    assert session.terminal_status == "failed" and session.failure_kind == "agent-failed"


def test_finish_run_message_is_null_when_absent_and_timeout_maps_to_failed():
    run = claim(make_run())
    done = finish(run, status="timeout", failure_kind="timeout")
    assert done.status == "failed" and done.terminal_status == "timeout"
    assert events_of(run.id)[-1].payload == {"terminalStatus": "timeout", "failureKind": "timeout", "message": None}


def test_finish_run_first_result_wins():
    run = claim(make_run())
    finish(run)
    count = len(events_of(run.id))
    again = finish(run, epoch=7, runner_id="else", status="failed")
    assert again.status == "completed" and len(events_of(run.id)) == count


def test_finish_run_requires_holder_and_epoch():
    run = claim(claim(make_run()))
    assert error_of(finish, run, epoch=1).kind == "runner-lease-conflict"
    assert error_of(finish, make_run(), epoch=0).kind == "runner-lease-conflict"
    assert Run.objects.get(pk=run.id).status == "claimed"


def test_finish_run_with_thread_returns_fresh_ref():
    run = claim(make_run(session_id="r2"))
    done = finish(run, thread_id="th-9", turn_id="tu")
    assert done.session_ref["threadId"] == "th-9"
    assert [p for _, p in phases(run.id)][-2:] == ["session-updated", None]


def test_run_ending_without_turn_leaves_session_idle():
    run = claim(make_run(session_id="r3"))
    finish(run)
    session = Session.objects.get(pk="r3")
    assert session.execution_state == "idle" and session.active_run_id is None and session.last_run_id == run.id


def test_late_end_of_old_run_does_not_touch_newer_run_pointers():
    old = claim(make_run(session_id="r4"))
    new = make_run(session_id="r4")
    claim(new, runner_id="r-new")
    add_command(new)
    finish(old)
    session = Session.objects.get(pk="r4")
    assert session.active_run_id == new.id and session.execution_state == "running"


def test_cancel_run_cascade_and_event_order():
    run = claim(make_run(session_id="r5"))
    turn = add_command(run)
    cancelled = services.run_cancel(run_id=run.id)
    assert (cancelled.status, cancelled.terminal_status, cancelled.failure_kind) == ("cancelled",) * 3
    assert cancelled.failure_message == "cancel requested" and cancelled.lease_expires_at is None
    tail = events_of(run.id)[-3:]
    assert tail[0].payload == {
        "phase": "command-terminal",
        "commandId": turn.id,
        "state": "cancelled",
        "terminalStatus": "cancelled",
        "failureKind": "cancelled",
    }
    assert tail[1].payload == {"phase": "cancel-requested", "reason": "cancel requested"}
    assert tail[2].payload == {"terminalStatus": "cancelled", "failureKind": "cancelled", "message": "cancel requested"}
    session = Session.objects.get(pk="r5")
    assert session.execution_state == "terminal" and session.terminal_status == "cancelled"
    count = len(events_of(run.id))
    assert services.run_cancel(run_id=run.id, reason="again").failure_message == "cancel requested"
    assert len(events_of(run.id)) == count


def test_run_expire_fails_run_and_bumps_epoch():
    run = claim(make_run())
    expired = services.run_expire(
        run_id=run.id, terminal_status="failed", failure_kind="runner-lost", message="lease lapsed"
    )
    assert expired.status == "failed" and expired.failure_kind == "runner-lost" and expired.lease_epoch == 2
    assert (
        error_of(
            services.event_append, run_id=run.id, runner_id="runner-1", lease_epoch=1, events=[("error", {})]
        ).status
        == 409
    )
    assert services.run_expire(run_id=run.id, terminal_status="failed", failure_kind="runner-lost", message="x") is None


# --- runners and runner jobs ---------------------------------------------------------------


def test_register_runner_upsert_keeps_fields_not_timestamps():
    runner, created = services.runner_register(
        tenant_id=TENANT, runner_id="rn", attributes={"pool": "a", "registeredAt": "1999-01-01T00:00:00Z"}
    )
    assert created and runner.attributes == {"pool": "a"}
    again, created_again = services.runner_register(tenant_id=TENANT, runner_id="rn", attributes={"pool": "b"})
    assert not created_again and again.attributes == {"pool": "b"}
    assert again.registered_at == runner.registered_at
    generated, _ = services.runner_register(tenant_id=TENANT)
    assert generated.id.startswith("runner_")
    error = error_of(services.runner_register, tenant_id="other", runner_id="rn")
    assert (error.kind, error.status) == ("tenant-policy-denied", 403)


def job_fields(**overrides):
    fields = {
        "command_id": "cmd_1",
        "payload_hash": "h1",
        "attempt_id": "a1",
        "runner_id": "rn",
        "namespace": "ns",
        "job_name": "job",
        "manager_url": "http://m",
        "image": "img",
        "source_commit": "abc",
        "service_account_name": None,
        "result": {"token": "kept as sent"},
    }
    fields.update(overrides)
    return fields


def test_runner_job_idempotency_and_listing_order():
    run = make_run()
    first, created = services.runner_job_save(run_id=run.id, fields=job_fields(), idempotency_key="k")
    again, created_again = services.runner_job_save(
        run_id=run.id, fields=job_fields(image="other"), idempotency_key="k"
    )
    assert created and not created_again and again.id == first.id and again.image == "img"
    assert first.result == {"token": "kept as sent"}  # runner job results are stored as sent
    error = error_of(services.runner_job_save, run_id=run.id, fields=job_fields(payload_hash="h2"), idempotency_key="k")
    assert (error.kind, error.status) == ("schema-invalid", 409)
    second, _ = services.runner_job_save(run_id=run.id, fields=job_fields(command_id="cmd_2"))
    assert [j.id for j in selectors.runner_job_list(run_id=run.id)] == [first.id, second.id]
    assert [j.id for j in selectors.runner_job_list(run_id=run.id, command_id="cmd_2")] == [second.id]


def test_runner_job_with_known_id_is_updated_in_place():
    run = make_run()
    _job, _ = services.runner_job_save(run_id=run.id, fields=job_fields(), job_id="rjob_mine")
    updated, created = services.runner_job_save(
        run_id=run.id, fields=job_fields(result={"exit": 0}), job_id="rjob_mine"
    )
    assert not created and updated.result == {"exit": 0} and RunnerJob.objects.count() == 1
    other = make_run()
    assert error_of(services.runner_job_save, run_id=other.id, fields=job_fields(), job_id="rjob_mine").status == 409


def test_event_rows_are_unique_per_run_seq():
    run = claim(make_run())
    services.event_append(run_id=run.id, runner_id="runner-1", lease_epoch=1, events=[("error", {})] * 3)
    seqs = list(RunEvent.objects.filter(run_id=run.id).values_list("seq", flat=True).order_by("seq"))
    assert seqs == list(range(1, len(seqs) + 1))


# --- transactions --------------------------------------------------------------------------


class Rollback(Exception):
    """Raised to undo a caller's transaction."""


def test_a_public_service_refuses_a_callers_transaction():
    run = make_run()
    with pytest.raises(RuntimeError, match="durable"), transaction.atomic():
        services.run_cancel(run_id=run.id)
    assert Run.objects.get(pk=run.id).status == "pending"


def test_a_step_refuses_to_run_outside_a_callers_transaction():
    run = make_run()
    command = add_command(run)
    steps = [
        (services.run_create_in_transaction, {"tenant_id": TENANT, "project_id": PROJECT, "backend_profile": "echo"}),
        (services.run_cancel_in_transaction, {"run_id": run.id}),
        (
            services.run_expire_in_transaction,
            {"run_id": run.id, "terminal_status": "failed", "failure_kind": "x", "message": "m"},
        ),
        (services.command_create_in_transaction, {"run_id": run.id, "command_type": "turn", "payload": {}}),
        (services.command_cancel_in_transaction, {"command_id": command.id}),
        (services.runner_job_save_in_transaction, {"run_id": run.id, "fields": job_fields()}),
    ]
    for step, arguments in steps:
        with pytest.raises(RuntimeError, match="must run inside its caller's transaction"):
            step(**arguments)
    assert Run.objects.count() == 1 and Run.objects.get(pk=run.id).status == "pending"
    assert Command.objects.get(pk=command.id).state == "pending" and not RunnerJob.objects.exists()


def test_steps_write_in_the_callers_transaction_and_are_undone_with_it():
    create = {"tenant_id": TENANT, "project_id": PROJECT, "backend_profile": "echo", "idempotency_key": "step"}
    with pytest.raises(Rollback), transaction.atomic():
        run, _ = services.run_create_in_transaction(**create)
        services.command_create_in_transaction(run_id=run.id, command_type="turn", payload={"prompt": "hi"})
        raise Rollback
    assert not Run.objects.exists() and not Command.objects.exists()
    with transaction.atomic():
        run, created = services.run_create_in_transaction(**create)
        command, _ = services.command_create_in_transaction(run_id=run.id, command_type="turn", payload={})
        services.command_cancel_in_transaction(command_id=command.id, reason="not this one")
        services.run_cancel_in_transaction(run_id=run.id, reason="not this run")
        again, created_again = services.run_create_in_transaction(**create)
    assert created and not created_again and again.id == run.id
    assert Command.objects.get(pk=command.id).failure_message == "not this one"
    assert Run.objects.get(pk=run.id).failure_message == "not this run"
    assert phases(run.id)[-3:] == [
        ("backend_status", "command-terminal"),
        ("backend_status", "cancel-requested"),
        ("terminal_status", None),
    ]
