"""The soak's invariant checker (bench/soak_checks.py) on a small hand-built world: silent on a
healthy one, and each invariant reported when the tables break it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from bench import soak_checks as checks
from bench.soak_checks import AckedEvent, Acknowledged, Claim
from queues.models import QueueAttempt, QueueTask
from runs.models import Command, Run, RunEvent

pytestmark = pytest.mark.django_db
NOW = timezone.now()


def make_run(run_id: str, *, status: str, epoch: int, events: list[tuple[str, dict]], **fields) -> Run:
    run = Run.objects.create(
        id=run_id,
        tenant_id="soak",
        project_id="soak",
        backend_profile="echo",
        payload_hash="h",
        status=status,
        lease_epoch=epoch,
        last_event_seq=len(events),
        created_at=NOW,
        updated_at=NOW,
        **fields,
    )
    for seq, (event_type, payload) in enumerate(events, start=1):
        add_event(run, seq, event_type, payload)
    return run


def add_event(run: Run, seq: int, event_type: str, payload: dict) -> None:
    RunEvent.objects.create(
        id=f"evt_{run.id}_{seq}",
        run=run,
        seq=seq,
        type=event_type,
        payload=payload,
        created_at=NOW,
        run_created_at=run.created_at,
    )


def make_command(command_id: str, run: Run, seq: int, state: str) -> None:
    Command.objects.create(
        id=command_id,
        run=run,
        seq=seq,
        type="turn",
        payload={},
        payload_hash="h",
        state=state,
        created_at=NOW,
        updated_at=NOW,
    )


def claimed(runner: str) -> tuple[str, dict]:
    return "backend_status", {"phase": "run-claimed", "runnerId": runner}


def command_terminal(command_id: str, state: str) -> tuple[str, dict]:
    return "backend_status", {"phase": "command-terminal", "commandId": command_id, "state": state}


def terminal(status: str, failure_kind: str | None = None) -> tuple[str, dict]:
    return "terminal_status", {"terminalStatus": status, "failureKind": failure_kind}


CREATED = ("backend_status", {"phase": "run-created"})
SAID = ("assistant_message", {"text": "hi"})


@pytest.fixture
def world() -> Acknowledged:
    """Run A completed one turn under r1; run B was claimed by r1, taken over by r2 and reaped;
    run C is task T's first attempt, claimed and mid-turn."""
    run_a = make_run(
        "run_a",
        status="completed",
        epoch=1,
        claimed_by="r1",
        terminal_status="completed",
        events=[
            CREATED,
            ("backend_status", {"phase": "command-created", "commandId": "cmd_a1"}),
            claimed("r1"),
            SAID,
            command_terminal("cmd_a1", "completed"),
            terminal("completed"),
        ],
    )
    make_command("cmd_a1", run_a, 1, "completed")
    make_run(
        "run_b",
        status="failed",
        epoch=3,
        claimed_by="r2",
        terminal_status="failed",
        failure_kind="runner-lost",
        events=[CREATED, claimed("r1"), SAID, claimed("r2"), SAID, terminal("failed", "runner-lost")],
    )
    run_c = make_run(
        "run_c",
        status="claimed",
        epoch=1,
        claimed_by="local-1",
        lease_expires_at=NOW + timedelta(hours=1),
        extra={"queueTaskId": "qt_t", "queueAttempt": 1},
        events=[CREATED, ("backend_status", {"phase": "command-created", "commandId": "cmd_c1"}), claimed("local-1")],
    )
    make_command("cmd_c1", run_c, 1, "acknowledged")
    task = QueueTask.objects.create(
        id="qt_t",
        tenant_id="soak",
        project_id="soak",
        queue="soak",
        lane="a",
        title="t",
        backend_profile="echo",
        version=1,
        payload_hash="h",
        state="running",
        attempt_count=1,
        created_at=NOW,
        updated_at=NOW,
    )
    QueueAttempt.objects.create(id="qa_t1", task=task, number=1, run_id="run_c", state="running", started_at=NOW)
    return Acknowledged(
        events=[
            AckedEvent("run_a", "evt_run_a_4", 4, "assistant_message", "r1", 1),
            AckedEvent("run_b", "evt_run_b_3", 3, "assistant_message", "r1", 1),
            AckedEvent("run_b", "evt_run_b_5", 5, "assistant_message", "r2", 2),
        ],
        records=[("run", "run_a"), ("run", "run_b"), ("run", "run_c"), ("command", "cmd_a1"), ("task", "qt_t")],
        claims=[Claim("run_a", "r1", 1), Claim("run_b", "r1", 1), Claim("run_b", "r2", 2)],
    )


def found(acknowledged: Acknowledged) -> set[str]:
    """The invariants broken, apart from `ended` (run C and task T are still running)."""
    with connection.cursor() as cursor:
        violations = checks.check_tables(cursor, acknowledged, grace_seconds=5)
    return {violation.invariant for violation in violations} - {checks.ENDED}


def test_a_healthy_world_breaks_nothing_but_its_running_task_has_not_ended(world):
    assert found(world) == set()
    with connection.cursor() as cursor:
        unfinished = checks.unfinished(cursor)
    assert sorted(violation.detail for violation in unfinished) == [
        "queue task qt_t still running",
        "run run_c still claimed",
    ]


def delete_acked_event(world):
    RunEvent.objects.filter(pk="evt_run_a_4").delete()


def second_terminal(world):
    add_event(Run.objects.get(pk="run_a"), 7, *terminal("completed"))
    Run.objects.filter(pk="run_a").update(last_event_seq=7)


def command_finished_twice(world):
    add_event(Run.objects.get(pk="run_a"), 7, *command_terminal("cmd_a1", "completed"))
    Run.objects.filter(pk="run_a").update(last_event_seq=7)


def command_left_open(world):
    make_command("cmd_a2", Run.objects.get(pk="run_a"), 2, "pending")


def claim_acknowledged_to_another(world):
    world.claims.append(Claim("run_b", "intruder", 2))


def stale_holder_appended(world):
    world.events[2] = AckedEvent("run_b", "evt_run_b_5", 5, "assistant_message", "r1", 1)


def epoch_without_claim(world):
    Run.objects.filter(pk="run_a").update(lease_epoch=2)


def second_run_for_an_attempt(world):
    make_run("run_d", status="pending", epoch=0, extra={"queueTaskId": "qt_t", "queueAttempt": 1}, events=[CREATED])


def attempt_missing(world):
    QueueTask.objects.filter(pk="qt_t").update(attempt_count=2)


def lease_lapsed(world):
    Run.objects.filter(pk="run_c").update(lease_expires_at=NOW - timedelta(hours=1))


def acknowledged_run_missing(world):
    world.records.append(("run", "run_never_written"))


@pytest.mark.parametrize(
    ("corrupt", "broken"),
    [
        (delete_acked_event, {checks.SEQ_GAPLESS, checks.LOST_WRITE}),
        (second_terminal, {checks.ONE_TERMINAL}),
        (command_finished_twice, {checks.ONE_COMMAND_TERMINAL}),
        (command_left_open, {checks.ONE_COMMAND_TERMINAL}),
        (claim_acknowledged_to_another, {checks.ONE_HOLDER}),
        (stale_holder_appended, {checks.ONE_HOLDER}),
        (epoch_without_claim, {checks.ONE_HOLDER}),
        (second_run_for_an_attempt, {checks.ONE_START}),
        (attempt_missing, {checks.ONE_START}),
        (lease_lapsed, {checks.LAPSED_LEASE}),
        (acknowledged_run_missing, {checks.LOST_WRITE}),
    ],
)
def test_each_broken_invariant_is_reported(world, corrupt, broken):
    corrupt(world)
    assert found(world) == broken
