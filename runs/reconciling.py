"""The reconciler: RunnerJobs against what Kubernetes says.

- A run whose Job failed, or vanished, while the run was claimed is finished as failed with
  `runner-lost` (its pod will not renew the lease; no need to wait for it to lapse). A pending
  run's dead Job is left to the launcher, which starts another attempt.
- A runner Job whose run has ended, or does not exist, is deleted (with its pods and Secret).
"""

from __future__ import annotations

from dataclasses import dataclass

from agentrun.launcher.kubernetes import RUN_LABEL, KubernetesLauncher, job_failed
from runs import services
from runs.models import RUN_TERMINAL, Run, RunnerJob, RunStatus


@dataclass(frozen=True)
class Finding:
    action: str  # fail-run or delete-job
    run_id: str
    job: str  # namespace/name
    detail: str


def reconcile(launcher: KubernetesLauncher, *, dry_run: bool = False) -> list[Finding]:
    findings = []
    # Each claimed run's latest launched job, in one query (DISTINCT ON the run; ties go to the
    # lowest id), with only the columns the loop reads.
    latest = (
        RunnerJob.objects.filter(run__status=RunStatus.CLAIMED, result__launched=True)
        .order_by("run_id", "-created_at", "id")
        .distinct("run_id")
        .only("run_id", "namespace", "job_name")
    )
    for job in latest:
        view = {"namespace": job.namespace, "jobName": job.job_name}
        found = launcher.read(view)
        reason = "its Job vanished" if found is None else job_failed(found)
        if reason is None:
            continue
        findings.append(Finding("fail-run", job.run_id, f"{job.namespace}/{job.job_name}", reason))
        if not dry_run:
            services.run_expire(
                run_id=job.run_id,
                terminal_status="failed",
                failure_kind="runner-lost",
                message=f"runner Job {job.namespace}/{job.job_name}: {reason}",
            )
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
    return findings
