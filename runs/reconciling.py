"""The reconciler: RunnerJobs against what Kubernetes says.

- A run whose Job failed, or vanished, while the run was claimed is finished as failed with
  `runner-lost` (its pod will not renew the lease; no need to wait for it to lapse). A pending
  run's dead Job is left to the launcher, which starts another attempt.
- No run is silently stuck on its pod: the pods of each live runner Job (a claimed run's, and a
  pending run's whose latest RunnerJob was launched, since a pod that never starts leaves its
  run pending) end the run when they say it cannot go on (`pod_failure`): unschedulable past
  AGENTRUN_UNSCHEDULABLE_GRACE_SECONDS, an image that cannot be pulled or a container that
  cannot be configured (a bundle's secret missing) are `infra-failed`; OOMKilled is
  `agent-failed`; an evicted, disrupted or node-lost pod is `runner-lost` (the queue retries
  those). The reason is the run's failureMessage and is in its terminal event.
- A runner Job whose run has ended, or does not exist, is deleted (with its pods and Secret).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from kubernetes import client

from agentrun import tallies
from agentrun.errors import INFRA_FAILED
from agentrun.launcher.kubernetes import BUNDLE_LABEL, RUN_LABEL, KubernetesLauncher, bundle_label, job_failed
from runs import services
from runs.models import RUN_TERMINAL, ResourceBundle, Run, RunnerJob, RunStatus

RUNNER_LOST = "runner-lost"
AGENT_FAILED = "agent-failed"
TIMEOUT = "timeout"
# Waiting reasons that mean the image will not come: the run cannot start.
IMAGE_FAILURES = frozenset({"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"})
# A pod's reasons (status.reason, a condition's reason) that mean its node went away.
NODE_LOST = frozenset({"NodeLost", "NodeShutdown"})
MESSAGE_LIMIT = 1000


@dataclass(frozen=True)
class Finding:
    action: str  # fail-run, delete-job or delete-policy
    run_id: str  # empty for a policy
    job: str  # namespace/name (of the Job, or of the policy)
    detail: str
    kind: str = ""  # fail-run: the run's failure kind
    reason: str = ""  # fail-run: Kubernetes' word for it (Unschedulable, OOMKilled, Evicted, BackoffLimitExceeded, ...)


@dataclass(frozen=True)
class PodFailure:
    kind: str
    reason: str
    message: str


def _text(value: str | None) -> str:
    return (value or "").strip()


def pod_failure(pod: client.V1Pod, *, now: datetime, unschedulable_grace: timedelta) -> PodFailure | None:
    """Why this runner pod means its run cannot go on, or None (it is fine, or may still start)."""
    status = pod.status
    if status is None:
        return None
    # The pod is gone from under the runner: not the agent's fault, so a retry may succeed.
    if status.reason == "Evicted" or status.reason in NODE_LOST:
        return PodFailure(RUNNER_LOST, status.reason, _text(status.message) or f"the pod was {status.reason}")
    conditions = status.conditions or []
    for condition in conditions:
        if condition.type == "DisruptionTarget" and condition.status == "True":
            reason = condition.reason or "DisruptionTarget"
            return PodFailure(RUNNER_LOST, reason, _text(condition.message) or "the pod was disrupted")
        if condition.reason in NODE_LOST:
            return PodFailure(RUNNER_LOST, condition.reason, _text(condition.message) or "its node was lost")
    for container in [*(status.init_container_statuses or []), *(status.container_statuses or [])]:
        waiting = container.state.waiting if container.state is not None else None
        if waiting is not None and (waiting.reason in IMAGE_FAILURES or waiting.reason == "CreateContainerConfigError"):
            detail = _text(waiting.message) or f"image {container.image}"
            return PodFailure(INFRA_FAILED, waiting.reason, f"container {container.name}: {waiting.reason}: {detail}")
        for state in (container.state, container.last_state):
            terminated = state.terminated if state is not None else None
            if terminated is not None and terminated.reason == "OOMKilled":
                return PodFailure(
                    AGENT_FAILED,
                    "OOMKilled",
                    f"container {container.name} was OOMKilled (exit code {terminated.exit_code}): "
                    f"it used more than its memory limit{_memory_limit(pod, container.name)}",
                )
    for condition in conditions:
        if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
            since = condition.last_transition_time or (pod.metadata.creation_timestamp if pod.metadata else None)
            if since is None or now - since < unschedulable_grace:
                return None  # the cluster may still make room (an autoscaler, a finishing pod)
            waited = (now - since).total_seconds()
            return PodFailure(
                INFRA_FAILED,
                "Unschedulable",
                f"unschedulable for {waited:.0f} s: {_text(condition.message) or 'no node fits it'}",
            )
    return None


def _memory_limit(pod: client.V1Pod, container_name: str) -> str:
    for container in (pod.spec.containers if pod.spec is not None else None) or []:
        if container.name == container_name and container.resources is not None:
            limit = (container.resources.limits or {}).get("memory")
            return f" ({limit})" if limit else ""
    return ""


def _job_reason(job: client.V1Job | None) -> str:
    if job is None:
        return "JobVanished"
    for condition in (job.status.conditions if job.status is not None else None) or []:
        if condition.type == "Failed" and condition.status == "True" and condition.reason:
            return condition.reason
    return "JobFailed"


def _pods_failure(launcher: KubernetesLauncher, view: dict, now: datetime) -> tuple[str, PodFailure] | None:
    """The first of the Job's pods that says its run cannot go on: (the pod's name, why)."""
    grace = timedelta(seconds=settings.AGENTRUN_UNSCHEDULABLE_GRACE_SECONDS)
    for pod in launcher.list_pods(view):
        failure = pod_failure(pod, now=now, unschedulable_grace=grace)
        if failure is not None:
            return (pod.metadata.name if pod.metadata is not None else None) or "?", failure
    return None


def reconcile(launcher: KubernetesLauncher, *, dry_run: bool = False) -> list[Finding]:
    findings = []
    # Kubernetes' timestamps (a condition's, a pod's creation) are the API server's clock.
    now = timezone.now()
    # Each live run's latest job, in one query (DISTINCT ON the run; ties go to the lowest id),
    # with only the columns the loop reads: a claimed run's latest launched job, a pending run's
    # latest job (looked at only when it was launched: else the launcher is still at it).
    latest = (
        RunnerJob.objects.filter(
            Q(run__status=RunStatus.CLAIMED, result__launched=True) | Q(run__status=RunStatus.PENDING)
        )
        .order_by("run_id", "-created_at", "id")
        .distinct("run_id")
        .values("run_id", "namespace", "job_name", "result", "run__status")
    )
    for job in latest:
        if not (job["result"] or {}).get("launched"):
            continue
        run_id, where = job["run_id"], f"{job['namespace']}/{job['job_name']}"
        view = {"runId": run_id, "namespace": job["namespace"], "jobName": job["job_name"]}
        claimed = job["run__status"] == RunStatus.CLAIMED
        found = launcher.read(view) if claimed else None
        job_reason = ("its Job vanished" if found is None else job_failed(found)) if claimed else None
        pods = _pods_failure(launcher, view, now) if found is not None or not claimed else None
        if pods is not None:
            pod_name, failure = pods
            kind, reason = failure.kind, failure.reason
            message = f"runner pod {job['namespace']}/{pod_name}: {failure.message}"[:MESSAGE_LIMIT]
        elif job_reason is not None:
            reason = _job_reason(found)
            # The Job's deadline is the run's timeoutSeconds plus a grace: the run timed out.
            kind = TIMEOUT if reason == "DeadlineExceeded" else RUNNER_LOST
            message = f"runner Job {where}: {job_reason}"[:MESSAGE_LIMIT]
        else:
            continue
        if not dry_run:
            ended = services.run_expire(
                run_id=run_id,
                terminal_status=TIMEOUT if kind == TIMEOUT else "failed",
                failure_kind=kind,
                message=message,
            )
            if ended is None:
                continue  # it ended meanwhile: nothing was done
        findings.append(Finding("fail-run", run_id, where, message, kind=kind, reason=reason))
    # A Job the API lists always has its metadata (its name): one without could not be deleted.
    k8s_jobs = [
        ((k8s_job.metadata.labels or {}).get(RUN_LABEL, ""), k8s_job.metadata)
        for k8s_job in launcher.list_jobs()
        if k8s_job.metadata is not None
    ]
    # One query for every Job's run, made after the runs failed above: their Jobs go in this pass.
    statuses = dict(Run.objects.filter(pk__in={run_id for run_id, _ in k8s_jobs}).values_list("id", "status"))
    terminal = set(map(str, RUN_TERMINAL))
    for run_id, metadata in k8s_jobs:
        status = statuses.get(run_id)
        if status is not None and status not in terminal:
            continue
        detail = "its run is gone" if status is None else f"its run is {status}"
        findings.append(Finding("delete-job", run_id, f"{metadata.namespace}/{metadata.name}", detail))
        if not dry_run:
            launcher.stop({"namespace": metadata.namespace, "jobName": metadata.name})
    findings += _stale_bundle_policies(launcher, dry_run=dry_run)
    if not dry_run:
        tallies.add(tallies.RECONCILER_ACTIONS, [item.action for item in findings])
    return findings


def _stale_bundle_policies(launcher: KubernetesLauncher, *, dry_run: bool) -> list[Finding]:
    """Delete the NetworkPolicies of bundles that were deleted or lost their allowlist (a launch
    deletes an emptied one too, but a deleted bundle launches nothing)."""
    live = {
        bundle_label(tenant_id, name)
        for tenant_id, name in ResourceBundle.objects.exclude(egress_allowlist=[]).values_list("tenant_id", "name")
    }
    findings = []
    for policy in launcher.list_bundle_policies():
        metadata = policy.metadata
        if metadata is None or not metadata.name or not metadata.namespace:
            continue
        label = (metadata.labels or {}).get(BUNDLE_LABEL)
        if label in live:
            continue
        findings.append(Finding("delete-policy", "", f"{metadata.namespace}/{metadata.name}", "its bundle is gone"))
        if not dry_run:
            launcher.delete_policy(metadata.namespace, metadata.name)
    return findings
