"""The reaper: lapsed leases past the grace period fail `runner-lost`; runs past their
timeoutSeconds fail `timeout`; a queue task behind the run follows its retry policy."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from kubernetes.client import V1Job, V1JobStatus, V1ObjectMeta

from agentrun.clock import db_now
from agentrun.launcher.kubernetes import RUN_LABEL
from queues.models import QueueTask
from runs import reaping, reconciling, services
from runs.models import Run
from tests.helpers import claim, make_run, make_task, settle_all

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


# --- the reconciler ----------------------------------------------------------------------------


JOB_FIELDS = {
    "command_id": "",
    "payload_hash": "h",
    "attempt_id": "1",
    "runner_id": "r",
    "namespace": "agents",
    "manager_url": "http://m",
    "image": "img",
    "source_commit": "",
}


class Cluster:
    """What the reconciler asks of a launcher: the state of one Job, its pods, the list of Jobs and of
    bundle policies, a delete."""

    def __init__(self):
        self.jobs = {}

    def add(self, run_id, name):
        metadata = V1ObjectMeta(name=name, namespace="agents", labels={RUN_LABEL: run_id})
        self.jobs[name] = V1Job(metadata=metadata, status=V1JobStatus(active=1))

    def read(self, view):
        return self.jobs.get(view["jobName"])

    def list_pods(self, view):
        return []  # healthy Jobs whose pods say nothing yet

    def list_jobs(self):
        return list(self.jobs.values())

    def list_bundle_policies(self):
        return []

    def stop(self, view):
        self.jobs.pop(view["jobName"])


def reconcile_queries(cluster, count):
    """Queries of a reconciler pass over `count` more healthy claimed runs and Jobs of ended runs."""
    for index in range(count):
        run = claim(make_run())
        for attempt in (1, 2):
            name = f"job-{run.id}-{attempt}"
            services.runner_job_save(
                run_id=run.id, fields={**JOB_FIELDS, "job_name": name, "result": {"launched": True}}
            )
            cluster.add(run.id, name)
        cluster.add(services.run_cancel(run_id=make_run().id).id, f"ended-{index}")
    with CaptureQueriesContext(connection) as captured:
        findings = reconciling.reconcile(cluster)
    assert {finding.action for finding in findings} == {"delete-job"} and len(findings) == count
    return len(captured.captured_queries)


def test_a_reconciler_pass_makes_the_same_queries_for_two_runs_or_twenty():
    cluster = Cluster()
    # The jobs, their runs, the bundles, and one upsert of the tallies (agentrun_reconciler_actions).
    assert reconcile_queries(cluster, 2) == reconcile_queries(cluster, 20) == 4
