"""Retention: events in daily partitions made ahead; `prune` drops whole days past every
tenant's retention and deletes the rest in batches; what is still going stays; sessions keep
their summary; a tenant's own retention wins over the default."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection, transaction

from agentrun.clock import db_now
from queues import retention as pruning
from queues.models import QueueAttempt, QueueTask, TenantRetention
from runs import retention, services
from runs.models import Command, Run, RunEvent
from sessions.models import Session
from tests.helpers import claim, make_run, make_task

pytestmark = pytest.mark.django_db


def partition_of(event: RunEvent) -> str:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tableoid::regclass::text FROM runs_runevent WHERE id = %s AND run_id = %s", [event.id, event.run_id]
        )
        return cursor.fetchone()[0]


def age(run: Run, days: float) -> None:
    """Make a run (and so its events' partition key) `days` old."""
    at = db_now() - timedelta(days=days)
    Run.objects.filter(pk=run.id).update(created_at=at)
    RunEvent.objects.filter(run_id=run.id).update(run_created_at=at)  # PostgreSQL moves the rows


def ended(days: float, **kwargs) -> Run:
    run = make_run(**kwargs)
    command = services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "hi"})[0]
    assert command.id
    services.run_cancel(run_id=run.id)
    age(run, days)
    return run


def test_events_land_in_their_run_s_week_and_weeks_ahead_exist():
    run = make_run()
    [event] = list(RunEvent.objects.filter(run_id=run.id))
    monday = retention.week_start(run.created_at)
    assert monday.weekday() == 0 and monday <= run.created_at < monday + timedelta(weeks=1)
    assert partition_of(event) == f"runs_runevent_p{monday:%Y%m%d}"
    names = {partition.name for partition in retention.partitions()}
    for offset in range(retention.WEEKS_AHEAD + 1):
        assert f"runs_runevent_p{monday + timedelta(weeks=offset):%Y%m%d}" in names
    # Idempotent, and a new week is made when it comes within reach.
    assert retention.ensure_partitions(now=db_now()) == []
    later = monday + timedelta(weeks=retention.WEEKS_AHEAD + 1)
    assert retention.ensure_partitions(now=db_now(), weeks_ahead=retention.WEEKS_AHEAD + 1) == [
        f"runs_runevent_p{later:%Y%m%d}"
    ]
    bounds = {partition.name: (partition.lower, partition.upper) for partition in retention.partitions()}
    assert bounds[f"runs_runevent_p{later:%Y%m%d}"] == (later, later + timedelta(weeks=1))


def test_a_run_s_seq_stays_unique_in_the_partitioned_table():
    run = make_run()
    [event] = list(RunEvent.objects.filter(run_id=run.id))
    with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO runs_runevent (id, run_id, seq, type, payload, created_at, run_created_at) "
            "VALUES ('evt_dup', %s, %s, 'usage', '{}', now(), %s)",
            [run.id, event.seq, event.run_created_at],
        )


def test_prune_deletes_ended_runs_past_retention_in_batches_and_keeps_the_rest():
    old = [ended(40) for _ in range(5)]
    recent = ended(5)
    going = make_run()
    claim(going)
    age(going, 40)  # older than the cutoff, but still running: kept
    done = pruning.prune(older_than=timedelta(days=30), batch=2)
    assert done.deleted.runs == 5 and done.deleted.commands == 5
    assert done.deleted.events >= 5 * 3  # created, command-created, cancelled… per run
    assert not Run.objects.filter(pk__in=[run.id for run in old]).exists()
    assert not RunEvent.objects.filter(run_id__in=[run.id for run in old]).exists()
    assert not Command.objects.filter(run_id__in=[run.id for run in old]).exists()
    assert Run.objects.filter(pk__in=[recent.id, going.id]).count() == 2
    assert RunEvent.objects.filter(run_id=going.id).exists()
    assert pruning.prune(older_than=timedelta(days=30)).deleted.runs == 0


def test_sessions_keep_their_summary():
    run = ended(40, session_id="kept-session")
    session = Session.objects.get(pk="kept-session")
    pruning.prune(older_than=timedelta(days=30))
    assert not Run.objects.filter(pk=run.id).exists()
    after = Session.objects.get(pk="kept-session")
    fields = ("title", "summary", "last_run_id", "terminal_status", "last_event_seq", "last_activity_at", "version")
    assert [getattr(after, name) for name in fields] == [getattr(session, name) for name in fields]
    assert after.last_run_id == run.id and after.terminal_status == "cancelled"


def test_a_tenant_s_own_retention_wins():
    short = ended(10, tenant="brief")
    long = ended(40, tenant="patient")
    default = ended(40)
    TenantRetention.objects.create(tenant_id="brief", retention_days=7)
    TenantRetention.objects.create(tenant_id="patient", retention_days=90)
    done = pruning.prune(older_than=timedelta(days=30))
    assert done.deleted.runs == 2
    assert set(Run.objects.values_list("id", flat=True)) >= {long.id}
    assert not Run.objects.filter(pk__in=[short.id, default.id]).exists()


def test_whole_weeks_past_every_retention_are_dropped_unless_a_run_there_is_going():
    now = db_now()
    old = ended(40)  # in the partition of everything before partitioning
    busy = make_run()
    claim(busy)  # this week's partition holds a run still going
    run = ended(0)  # this week, ended
    # Ten days on, with a day's retention: this week and everything before it are past it.
    done = pruning.prune(older_than=timedelta(days=1), now=now + timedelta(days=10))
    assert done.partition_events >= 3  # the old run's, dropped whole
    assert not Run.objects.filter(pk=old.id).exists()
    today = f"runs_runevent_p{retention.week_start(now):%Y%m%d}"
    assert "runs_runevent_before" in done.partitions and today not in done.partitions
    names = {partition.name for partition in retention.partitions()}
    assert "runs_runevent_before" not in names and today in names
    # This week's ended run went by batch instead; the running one stays with its events.
    assert not Run.objects.filter(pk=run.id).exists()
    assert RunEvent.objects.filter(run_id=busy.id).exists()


def test_finished_queue_tasks_go_pending_ones_stay():
    from queues.services import task_cancel

    finished = make_task("old-q")
    task_cancel(task_id=finished.id)
    waiting = make_task("old-q")
    QueueTask.objects.update(updated_at=db_now() - timedelta(days=40))
    done = pruning.prune(older_than=timedelta(days=30))
    assert done.tasks == 1
    assert list(QueueTask.objects.values_list("id", flat=True)) == [waiting.id]
    assert not QueueAttempt.objects.filter(task_id=finished.id).exists()


def test_dry_run_counts_and_changes_nothing():
    runs = [ended(40) for _ in range(3)]
    out = io.StringIO()
    call_command("prune", "--older-than", "30d", "--dry-run", stdout=out)
    assert "delete 3 run(s)" in out.getvalue() and "nothing changed" in out.getvalue()
    assert Run.objects.filter(pk__in=[run.id for run in runs]).count() == 3
    out = io.StringIO()
    call_command("prune", "--older-than", "30d", stdout=out)
    assert "deleted 3 run(s)" in out.getvalue()
    assert not Run.objects.filter(pk__in=[run.id for run in runs]).exists()


def test_prune_s_arguments(settings):
    for junk in ("0", "thirty", "-1d"):
        with pytest.raises(CommandError):
            call_command("prune", "--older-than", junk)
    with pytest.raises(CommandError, match="batch"):
        call_command("prune", "--older-than", "30d", "--batch", "0")
    with pytest.raises(CommandError, match="pause"):
        call_command("prune", "--older-than", "30d", "--pause", "-1")
    settings.AGENTRUN_RETENTION = ""
    with pytest.raises(CommandError, match="older-than"):
        call_command("prune")
    settings.AGENTRUN_RETENTION = "30d"
    call_command("prune", stdout=io.StringIO())


@pytest.mark.django_db(transaction=True)
def test_appends_go_on_while_a_prune_runs():
    """A runner appends to a live run while prune deletes thousands of old events in batches:
    every append commits, in order, and the live run loses nothing."""
    from tests.helpers import Threads

    for _ in range(20):
        run = ended(40)
        claimed = run
        assert claimed
    live = make_run()
    lease = claim(live)
    stop = []

    def append(_index):
        count = 0
        try:
            while not stop:
                services.event_append(
                    run_id=live.id,
                    runner_id="runner-1",
                    lease_epoch=lease.lease_epoch,
                    events=[("assistant_message", {"text": f"line {count}"})],
                )
                count += 1
            return count
        finally:
            connection.close()

    writer = Threads(1, append)
    pruning.prune(older_than=timedelta(days=30), batch=3)
    stop.append(True)
    [appended] = writer.join(30)
    seqs = list(RunEvent.objects.filter(run_id=live.id).order_by("seq").values_list("seq", flat=True))
    assert appended >= 1 and seqs == list(range(1, len(seqs) + 1))
    assert Run.objects.count() == 1


def test_a_run_with_many_events_is_deleted_in_small_transactions():
    big = ended(40)
    lease = claim(make_run())
    assert lease
    count = RunEvent.objects.filter(run_id=big.id).count()
    assert count >= 3
    done = retention.delete_runs([big.id], max_events=1)
    assert (done.runs, done.events) == (1, count)
    assert not RunEvent.objects.filter(run_id=big.id).exists() and not Run.objects.filter(pk=big.id).exists()
