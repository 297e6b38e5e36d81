"""The reconciler: RunnerJobs against what Kubernetes says.

- A run whose Job failed, or vanished, while the run was claimed is finished as failed with
  `runner-lost` (its pod will not renew the lease; no need to wait for it to lapse). A pending
  run's dead Job is left to the launcher, which starts another attempt.
- A runner Job whose run has ended, or does not exist, is deleted (with its pods and Secret).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Max

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
    latest = (
        RunnerJob.objects.filter(run__status=RunStatus.CLAIMED, result__launched=True)
        .values("run_id")
        .annotate(last=Max("created_at"))
    )
    for row in latest:
        job = RunnerJob.objects.filter(run_id=row["run_id"], created_at=row["last"]).first()
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
    terminal = set(map(str, RUN_TERMINAL))
    for k8s_job in launcher.list_jobs():
        run_id = (k8s_job.metadata.labels or {}).get(RUN_LABEL, "")
        run = Run.objects.filter(pk=run_id).only("status").first()
        if run is not None and run.status not in terminal:
            continue
        detail = "its run is gone" if run is None else f"its run is {run.status}"
        findings.append(Finding("delete-job", run_id, f"{k8s_job.metadata.namespace}/{k8s_job.metadata.name}", detail))
        if not dry_run:
            launcher.stop({"namespace": k8s_job.metadata.namespace, "jobName": k8s_job.metadata.name})
    return findings
