"""The reconciler reads the pods of every live runner Job and ends the runs they leave stuck,
on the fake API server (pods validated against the Kubernetes schema like every body)."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command

from agentrun.launcher.kubernetes import KubernetesLauncher
from runs import launching, reconciling
from runs.models import Run, RunnerJob
from tests.helpers import claim, events_of, make_run

pytestmark = pytest.mark.django_db
NS = "agents"
IMAGE = "registry.example.com/agentrun:1.0"


@pytest.fixture
def k8s(fake_cluster, settings):
    settings.AGENTRUN_NAMESPACE = NS
    settings.AGENTRUN_UNSCHEDULABLE_GRACE_SECONDS = 300
    return KubernetesLauncher(image=IMAGE)


def stamp(ago: float = 0.0) -> str:
    """A Kubernetes timestamp `ago` seconds in the past."""
    return (datetime.now(UTC) - timedelta(seconds=ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def runner_status(state: dict, *, name: str = "runner", last_state: dict | None = None) -> dict:
    return {
        "name": name,
        "image": IMAGE,
        "imageID": "",
        "ready": False,
        "restartCount": 0,
        "state": state,
        **({"lastState": last_state} if last_state else {}),
    }


def waiting(reason: str, message: str, **fields) -> dict:
    return {
        "phase": "Pending",
        "containerStatuses": [runner_status({"waiting": {"reason": reason, "message": message}})],
    }


def unschedulable(*, ago: float | None) -> dict:
    condition = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes are available: 3 Insufficient memory.",
    }
    if ago is not None:
        condition["lastTransitionTime"] = stamp(ago)
    return {"phase": "Pending", "conditions": [condition]}


def launched(k8s, *, claimed: bool) -> tuple[Run, RunnerJob]:
    run = make_run()
    assert launching.launch_pending(k8s) == 1
    if claimed:
        claim(run)
    return run, RunnerJob.objects.get(run_id=run.id)


def failures(k8s) -> list[reconciling.Finding]:
    """One reconcile pass; the runs it failed (the Jobs it deletes of those runs are left out)."""
    return [finding for finding in reconciling.reconcile(k8s) if finding.action == "fail-run"]


def assert_failed(run: Run, kind: str, *pieces: str) -> None:
    """The run's row and its terminal event say it failed with `kind`, for a reason naming each piece."""
    row = Run.objects.get(pk=run.id)
    assert (row.status, row.terminal_status, row.failure_kind) == ("failed", "failed", kind)
    for piece in pieces:
        assert piece in row.failure_message, (piece, row.failure_message)
    terminal = events_of(run.id)[-1]
    assert terminal.type == "terminal_status"
    assert terminal.payload == {"terminalStatus": "failed", "failureKind": kind, "message": row.failure_message}


IMAGE_STATES = [
    ("ImagePullBackOff", 'Back-off pulling image "registry.example.com/agentrun:1.0"'),
    ("ErrImagePull", "rpc error: code = NotFound desc = manifest unknown"),
    ("InvalidImageName", 'Failed to apply default image tag "Bad Image": invalid reference format'),
]


@pytest.mark.parametrize(("reason", "message"), IMAGE_STATES)
def test_a_pending_run_whose_image_cannot_be_pulled_fails_infra_failed(k8s, fake_cluster, reason, message):
    run, job = launched(k8s, claimed=False)
    pod = fake_cluster.start_pod(NS, job.job_name, waiting(reason, message))
    finding, deleted = reconciling.reconcile(k8s)
    assert (finding.action, finding.run_id, finding.kind, finding.reason) == (
        "fail-run",
        run.id,
        "infra-failed",
        reason,
    )
    assert (deleted.action, deleted.run_id) == ("delete-job", run.id)  # its Job goes in the same pass
    assert_failed(run, "infra-failed", f"runner pod {NS}/{pod}", reason, message)
    assert not fake_cluster.of("jobs") and not fake_cluster.of("pods")
    assert reconciling.reconcile(k8s) == []


def test_an_init_container_that_cannot_pull_fails_the_run_too(k8s, fake_cluster):
    run, job = launched(k8s, claimed=False)
    status = {
        "phase": "Pending",
        "initContainerStatuses": [runner_status({"waiting": {"reason": "ErrImagePull"}}, name="prepare")],
        "containerStatuses": [runner_status({"waiting": {"reason": "PodInitializing"}})],
    }
    fake_cluster.start_pod(NS, job.job_name, status)
    (finding,) = failures(k8s)
    assert (finding.kind, finding.reason) == ("infra-failed", "ErrImagePull")
    assert_failed(run, "infra-failed", "container prepare: ErrImagePull", IMAGE)


def test_a_missing_bundle_secret_fails_the_run_with_its_message(k8s, fake_cluster):
    run, job = launched(k8s, claimed=False)
    fake_cluster.start_pod(NS, job.job_name, waiting("CreateContainerConfigError", 'secret "llm-keys" not found'))
    (finding,) = failures(k8s)
    assert (finding.kind, finding.reason) == ("infra-failed", "CreateContainerConfigError")
    assert_failed(run, "infra-failed", 'CreateContainerConfigError: secret "llm-keys" not found')


def test_an_unschedulable_pod_fails_its_run_only_after_the_grace(k8s, fake_cluster, settings):
    young, young_job = launched(k8s, claimed=False)
    old, old_job = launched(k8s, claimed=False)
    unstamped, unstamped_job = launched(k8s, claimed=False)
    fake_cluster.start_pod(NS, young_job.job_name, unschedulable(ago=60))
    fake_cluster.start_pod(NS, old_job.job_name, unschedulable(ago=400))
    # No lastTransitionTime: measured from the pod's creation.
    fake_cluster.start_pod(NS, unstamped_job.job_name, unschedulable(ago=None), created=stamp(301))
    findings = failures(k8s)
    assert sorted((f.run_id, f.kind, f.reason) for f in findings) == sorted(
        [(old.id, "infra-failed", "Unschedulable"), (unstamped.id, "infra-failed", "Unschedulable")]
    )
    assert_failed(old, "infra-failed", "unschedulable for 4", "0/3 nodes are available: 3 Insufficient memory.")
    assert Run.objects.get(pk=young.id).status == "pending"  # the cluster may still make room
    assert Run.objects.get(pk=young.id).failure_kind is None
    settings.AGENTRUN_UNSCHEDULABLE_GRACE_SECONDS = 30
    (finding,) = failures(k8s)
    assert finding.run_id == young.id
    assert_failed(young, "infra-failed", "unschedulable for 6")


def test_an_oomkilled_runner_fails_its_run_agent_failed(k8s, fake_cluster):
    run, job = launched(k8s, claimed=True)
    terminated = {"terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": stamp(30), "finishedAt": stamp()}}
    fake_cluster.start_pod(NS, job.job_name, {"phase": "Failed", "containerStatuses": [runner_status(terminated)]})
    fake_cluster.set_job_status(
        NS,
        job.job_name,
        {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
    )
    (finding, deleted) = reconciling.reconcile(k8s)  # the pod says why the Job failed
    assert (finding.kind, finding.reason) == ("agent-failed", "OOMKilled")
    assert deleted.action == "delete-job" and deleted.run_id == run.id
    assert_failed(run, "agent-failed", "OOMKilled", "exit code 137", "memory limit (1Gi)")


LOST = [
    ({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}, "Evicted"),
    (
        {
            "phase": "Running",
            "conditions": [
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "DeletionByTaintManager",
                    "message": "Taint manager: deleting due to NoExecute taint",
                }
            ],
        },
        "DeletionByTaintManager",
    ),
    (
        {"phase": "Unknown", "reason": "NodeLost", "message": "Node n1 which was running pod p is unresponsive"},
        "NodeLost",
    ),
]


@pytest.mark.parametrize(("status", "reason"), LOST, ids=[reason for _, reason in LOST])
@pytest.mark.parametrize("claimed", [True, False], ids=["claimed", "pending"])
def test_an_evicted_disrupted_or_node_lost_pod_loses_its_runner(k8s, fake_cluster, status, reason, claimed):
    run, job = launched(k8s, claimed=claimed)
    fake_cluster.start_pod(NS, job.job_name, status)
    (finding,) = failures(k8s)
    assert (finding.run_id, finding.kind, finding.reason) == (run.id, "runner-lost", reason)
    assert_failed(run, "runner-lost", status.get("message") or status["conditions"][0]["message"])


def test_healthy_pods_are_left_alone_in_three_queries_whatever_the_number_of_runs(
    k8s, fake_cluster, django_assert_num_queries
):
    runs = [launched(k8s, claimed=index % 2 == 0) for index in range(4)]
    running = {"phase": "Running", "containerStatuses": [runner_status({"running": {"startedAt": stamp(5)}})]}
    creating = waiting("ContainerCreating", "")
    for index, (_, job) in enumerate(runs):
        fake_cluster.start_pod(NS, job.job_name, running if index % 2 == 0 else creating)
    with django_assert_num_queries(3):  # the runs' latest jobs, the Jobs' runs, the bundles with policies
        assert reconciling.reconcile(k8s) == []
    assert {run.status for run in Run.objects.all()} == {"pending", "claimed"}


def test_pods_are_read_by_their_run_and_job(k8s, fake_cluster):
    run, job = launched(k8s, claimed=False)
    other, other_job = launched(k8s, claimed=False)
    fake_cluster.start_pod(NS, other_job.job_name, waiting("ImagePullBackOff", "no"))
    (finding,) = failures(k8s)
    assert finding.run_id == other.id and Run.objects.get(pk=run.id).status == "pending"
    selectors = {
        request.args["labelSelector"] for request, _ in fake_cluster.fake.server.log if request.path.endswith("/pods")
    }
    assert f"agentrun.io/run-id={run.id},job-name={job.job_name}" in selectors


def test_the_dry_run_reports_stuck_pods_and_changes_nothing(k8s, fake_cluster):
    pulling, pulling_job = launched(k8s, claimed=False)
    oom, oom_job = launched(k8s, claimed=True)
    fake_cluster.start_pod(NS, pulling_job.job_name, waiting("ImagePullBackOff", "Back-off pulling image"))
    terminated = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    fake_cluster.start_pod(NS, oom_job.job_name, {"phase": "Failed", "containerStatuses": [runner_status(terminated)]})
    out = io.StringIO()
    call_command("reconcile", "--dry-run", stdout=out)
    printed = out.getvalue()
    assert f"would fail run {pulling.id} (infra-failed, ImagePullBackOff): runner pod {NS}/" in printed
    assert f"would fail run {oom.id} (agent-failed, OOMKilled)" in printed
    assert "dry run: 2 finding(s)" in printed
    rows = {row.id: row for row in Run.objects.all()}
    assert (rows[pulling.id].status, rows[pulling.id].failure_kind) == ("pending", None)
    assert (rows[oom.id].status, rows[oom.id].failure_kind) == ("claimed", None)
    assert events_of(pulling.id)[-1].type != "terminal_status"
    assert len(fake_cluster.of("jobs")) == 2 and len(fake_cluster.of("pods")) == 2
    out = io.StringIO()
    call_command("reconcile", stdout=out)
    assert f"failed run {pulling.id} (infra-failed, ImagePullBackOff)" in out.getvalue()
    assert "4 finding(s)" in out.getvalue()  # two runs failed, and their two Jobs deleted
    assert_failed(pulling, "infra-failed", "ImagePullBackOff")
    assert_failed(oom, "agent-failed", "OOMKilled")
    assert not fake_cluster.of("jobs")
