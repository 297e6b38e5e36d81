"""Starting runners: the local launcher runs the reference runner as a subprocess for every
pending run, never two for one run; dead launches are retried, then the run fails."""

from __future__ import annotations

import pytest

from agentrun.launcher import Launcher, launcher_from_settings
from agentrun.launcher.local import LocalLauncher
from agentrun.models import ApiKey
from runs import launching, services
from runs.models import Run, RunEvent, RunnerJob
from tests.helpers import RecordingLauncher, in_threads, make_run, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def local(live_server, settings, tmp_path):
    settings.AGENTRUN_URL = live_server.url
    settings.VAR_DIR = tmp_path
    return LocalLauncher(log_dir=tmp_path / "logs", extra_args=["--idle-seconds", "0.3", "--lease-ms", "5000"])


def test_the_local_launcher_runs_a_pending_run_to_its_end(local):
    run = make_run(session_id="launch-s1")
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "hi from the launcher"})
    assert launching.launch_pending(local) == 1
    job = RunnerJob.objects.get(run_id=run.id)
    assert job.result["launched"] and job.result["pid"] and job.namespace == "local"
    key = ApiKey.objects.get(pk=job.result["keyId"])
    assert (key.role, key.run_id) == ("runner", run.id)  # a key for this run alone
    assert wait_for(lambda: Run.objects.get(pk=run.id).status == "completed"), (
        local.log_dir / f"{run.id}.log"
    ).read_text()
    assert RunEvent.objects.filter(
        run_id=run.id, type="assistant_message", payload__text="hi from the launcher"
    ).exists()
    assert launching.launch_pending(local) == 0  # nothing pending
    assert wait_for(lambda: not local.alive({"runId": run.id, "details": job.result}))
    assert launching.stop_finished(local) == 1
    key.refresh_from_db()
    assert key.revoked_at is not None  # the run's key dies with the run


def test_never_two_runners_for_one_run(local):
    run = make_run()
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "sleep: 2"})
    results = in_threads(4, lambda _: launching.launch_pending(local))
    assert sum(results) == 1 and RunnerJob.objects.filter(run_id=run.id).count() == 1
    assert launching.launch_pending(local) == 0  # the runner is alive
    assert wait_for(lambda: Run.objects.get(pk=run.id).status == "completed")


def test_dead_launches_are_retried_then_the_run_fails():
    launcher = RecordingLauncher(alive=False)
    run = make_run()
    for _ in range(launching.MAX_LAUNCHES):
        assert launching.launch_pending(launcher) == 1
    assert [spec.attempt for spec in launcher.specs] == [1, 2, 3]
    assert len({spec.runner_key for spec in launcher.specs}) == 3
    assert launching.launch_pending(launcher) == 0
    stored = Run.objects.get(pk=run.id)
    assert (stored.status, stored.failure_kind) == ("failed", "infra-failed")


class Exploding(Launcher):
    name = "test"

    def launch(self, spec):
        raise RuntimeError("no cluster today")


def test_a_launch_that_raises_is_recorded_and_retried():
    run = make_run()
    assert launching.launch_pending(Exploding()) == 0
    job = RunnerJob.objects.get(run_id=run.id)
    assert job.result["failed"] and "no cluster today" in job.result["error"]
    assert ApiKey.objects.get(pk=job.result["keyId"]).revoked_at is not None
    launcher = RecordingLauncher(alive=False)
    assert launching.launch_pending(launcher) == 1 and launcher.specs[0].attempt == 2


def test_launcher_from_settings():
    assert launcher_from_settings("none").name == "none"
    assert launcher_from_settings("local").name == "local"
    with pytest.raises(ValueError):
        launcher_from_settings("docker")
    assert launching.launch_pending(launcher_from_settings("none")) == 0
