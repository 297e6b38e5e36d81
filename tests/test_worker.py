"""`manage.py worker --once` is one pass of everything the loop does (settings/worker.py)."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from runs import launching, services
from runs.models import Run, RunnerJob
from tests.helpers import claim, make_run

pytestmark = pytest.mark.django_db
NS = "agents"


@pytest.fixture
def kubernetes(fake_cluster, settings):
    settings.AGENTRUN_LAUNCHER = "kubernetes"
    settings.AGENTRUN_NAMESPACE = NS
    settings.AGENTRUN_URL = "http://manager.agents.svc:8000"
    settings.AGENTRUN_RUNNER_IMAGE = "registry.example.com/agentrun:1.0"
    return fake_cluster


def test_one_pass_launches_stops_reaps_and_reconciles(kubernetes):
    from agentrun.launcher import launcher_from_settings

    ended, vanished = make_run(), make_run()
    assert launching.launch_pending(launcher_from_settings()) == 2
    for run in (ended, vanished):
        claim(run)
    jobs = {job.run_id: job.job_name for job in RunnerJob.objects.all()}
    services.run_cancel(run_id=ended.id)
    del kubernetes.objects[("jobs", NS, jobs[vanished.id])]
    pending = make_run()

    out = io.StringIO()
    call_command("worker", "--once", "--gc-interval", "0", stdout=out)

    assert out.getvalue().strip() == (
        "settled 0 attempt(s), dispatched 0 task(s), launched 1 runner(s), stopped 1 runner(s), "
        "reaped 0 run(s), reconciled 1 job(s), sent 0 webhook(s)"
    )
    assert RunnerJob.objects.filter(run_id=pending.id).exists()  # launched
    assert jobs[ended.id] not in kubernetes.of("jobs")  # the ended run's runner stopped
    assert Run.objects.get(pk=vanished.id).failure_kind == "runner-lost"  # reconciled in the same pass


def test_one_pass_collects_expired_storage_unless_gc_is_off():
    out = io.StringIO()
    call_command("worker", "--once", stdout=out)
    assert "deleted 0" in out.getvalue()  # gc_sessions ran
    out = io.StringIO()
    call_command("worker", "--once", "--gc-interval", "0", stdout=out)
    assert "deleted" not in out.getvalue()
