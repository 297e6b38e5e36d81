"""The reaper: lapsed leases past the grace period fail `runner-lost`; runs past their
timeoutSeconds fail `timeout`; a queue task behind the run follows its retry policy."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import call_command

from agentrun.clock import db_now
from queues.models import QueueTask
from runs import reaping, services
from runs.models import Run
from tests.conftest import claim, make_run
from tests.queue_helpers import make_task, settle_all

pytestmark = pytest.mark.django_db


def lapse(run, seconds_ago):
    Run.objects.filter(pk=run.id).update(lease_expires_at=db_now() - timedelta(seconds=seconds_ago))


def test_a_lease_lapsed_past_the_grace_period_fails_runner_lost(settings):
    settings.AGENTRUN_REAP_GRACE_SECONDS = 30
    lost, recent, healthy = make_run(), make_run(), make_run()
    for run in (lost, recent, healthy):
        claim(run)
    lapse(lost, 31)
    lapse(recent, 5)
    [item] = reaping.reap()
    assert (item.run_id, item.reason) == (lost.id, "runner-lost")
    stored = Run.objects.get(pk=lost.id)
    assert (stored.status, stored.terminal_status, stored.failure_kind) == ("failed", "failed", "runner-lost")
    assert stored.lease_epoch == 2  # fenced: the old runner's epoch 1 is stale
    assert Run.objects.get(pk=recent.id).status == "claimed"  # within the grace: another runner may take it
    assert reaping.reap() == []


def test_a_run_past_its_timeout_times_out():
    run = make_run(execution_policy={"timeoutSeconds": 60})
    claim(run)
    Run.objects.filter(pk=run.id).update(claimed_at=db_now() - timedelta(seconds=61))
    other = make_run(execution_policy={"timeoutSeconds": 600})
    claim(other)
    [item] = reaping.reap()
    assert item.run_id == run.id and item.reason == "timeout"
    stored = Run.objects.get(pk=run.id)
    assert (stored.status, stored.terminal_status, stored.failure_kind) == ("failed", "timeout", "timeout")
    assert Run.objects.get(pk=other.id).status == "claimed"


def test_dry_run_changes_nothing():
    run = make_run()
    claim(run)
    lapse(run, 3600)
    out = io.StringIO()
    call_command("reap_leases", "--dry-run", stdout=out)
    assert f"would fail {run.id}: runner-lost" in out.getvalue() and "dry run: 1 run(s) due" in out.getvalue()
    assert Run.objects.get(pk=run.id).status == "claimed"
    out = io.StringIO()
    call_command("reap_leases", stdout=out)
    assert out.getvalue().strip().endswith("1 run(s) reaped")
    assert Run.objects.get(pk=run.id).status == "failed"


def test_a_reaped_queue_run_is_retried_by_a_new_run():
    from queues import services as queue_services

    task = make_task(execution_policy={"maxAttempts": 2, "backoffSeconds": 0})
    first = queue_services.dispatch_one()
    services.run_claim(run_id=first.run_id, runner_id="doomed", lease_ms=60_000)
    Run.objects.filter(pk=first.run_id).update(lease_expires_at=db_now() - timedelta(hours=1))
    reaping.reap()
    settle_all()
    assert QueueTask.objects.get(pk=task.id).state == "pending"
    second = queue_services.dispatch_one()
    assert second.task_id == task.id and second.run_id != first.run_id and second.attempt == 2
