"""Starting runners: for every pending run without a live runner job, mint a run-scoped runner
key, record the RunnerJob, and ask the launcher to start it; and stop the runners of runs that
ended. Never two runners for one run: the decision and the record are made under the run's
row lock (SKIP LOCKED, so two workers split the runs between them), and a record's
idempotency key (`launch:<run>:<attempt>`) makes a repeated attempt one job."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction

from agentrun import tallies
from agentrun.auth import api_key_create, api_key_revoke
from agentrun.backends import can
from agentrun.clock import db_now
from agentrun.errors import INFRA_FAILED, AgentRunError
from agentrun.ids import stable_hash
from agentrun.launcher import Bundle, Launcher, LaunchSpec, SecretEnv
from runs import services
from runs.models import RUN_TERMINAL, ResourceBundle, Run, RunnerJob, RunStatus
from sessions import services as session_services
from sessions.models import Session, StorageKind

logger = logging.getLogger(__name__)
MAX_LAUNCHES = 3
# A job recorded but not yet confirmed by its launcher counts as live this long.
LAUNCH_GRACE = timedelta(seconds=60)


def _job_view(job: RunnerJob) -> dict:
    return {"runId": job.run_id, "namespace": job.namespace, "jobName": job.job_name, "details": job.result or {}}


def _live(job: RunnerJob, launcher: Launcher, now: datetime) -> bool:
    if job.stopped_at is not None or (job.result or {}).get("failed"):
        return False
    if not (job.result or {}).get("launched"):
        return now - job.created_at < LAUNCH_GRACE
    return launcher.alive(_job_view(job))


def launch_pending(launcher: Launcher, *, limit: int = 50) -> int:
    """One pass; returns how many runners were started."""
    if launcher.name == "none":
        return 0
    launcher.poll()
    started = 0
    pending = Run.objects.filter(status=RunStatus.PENDING).order_by("created_at").values_list("id", flat=True)[:limit]
    for run_id in pending:
        started += _launch_one(launcher, run_id)
    return started


def _launch_one(launcher: Launcher, run_id: str) -> bool:
    with transaction.atomic():
        run = Run.objects.select_for_update(skip_locked=True).filter(pk=run_id, status=RunStatus.PENDING).first()
        if run is None:
            return False
        now = db_now()
        jobs = list(RunnerJob.objects.filter(run_id=run.id).order_by("created_at", "id"))
        if any(_live(job, launcher, now) for job in jobs):
            return False
        if len(jobs) >= MAX_LAUNCHES:
            services.run_expire_in_transaction(
                run_id=run.id,
                terminal_status="failed",
                failure_kind=INFRA_FAILED,
                message=f"no runner started after {len(jobs)} launches"
                + (f": {jobs[-1].result['error']}" if (jobs[-1].result or {}).get("error") else ""),
            )
            return False
        attempt = len(jobs) + 1
        runner_id = f"{launcher.name}-{run.id}-{attempt}"
        key, raw_key = api_key_create(
            tenant_id=run.tenant_id,
            project_id=run.project_id,
            role="runner",
            run_id=run.id,
            name=f"runner for {run.id}",
        )
        try:
            bundle = _launch_bundle(run)
        except LookupError as exc:
            services.run_expire_in_transaction(
                run_id=run.id, terminal_status="failed", failure_kind=INFRA_FAILED, message=str(exc)
            )
            return False
        session = _session_storage(run)
        spec = LaunchSpec(
            run_id=run.id,
            attempt=attempt,
            runner_id=runner_id,
            runner_key=raw_key,
            manager_url=settings.AGENTRUN_URL,
            backend_profile=run.backend_profile,
            tenant_id=run.tenant_id,
            project_id=run.project_id,
            session_id=run.session_id,
            # A backend that resumes its thread keeps it on the session's volume, and a git
            # workspace of a session lives there so the session's next run continues on it.
            needs_storage=can(run.backend_profile, "resume") or (run.session_id is not None and _git_workspace(run)),
            bundle=bundle,
            timeout_seconds=_timeout_seconds(run),
            **session,
        )
        fields = {
            "command_id": "",
            "payload_hash": stable_hash({"run": run.id, "attempt": attempt}),
            "attempt_id": str(attempt),
            "runner_id": runner_id,
            "namespace": "",
            "job_name": "",
            "manager_url": settings.AGENTRUN_URL,
            "image": "",
            "source_commit": "",
            "result": {"keyId": key.pk},
        }
        job, created = services.runner_job_save_in_transaction(
            run_id=run.id, fields=fields, idempotency_key=f"launch:{run.id}:{attempt}"
        )
        if not created:
            return False
    # Outside the lock: starting a Job or a process may take a while. The record holds the place.
    try:
        launched = launcher.launch(spec)
        if launched is None:
            raise RuntimeError(f"the {launcher.name} launcher started no runner")
    except Exception as exc:
        logger.exception("launching a runner for run %s failed", run_id)
        tallies.add(tallies.LAUNCHER_FAILURES, [launcher.name])
        api_key_revoke(key_ids=[key.pk])  # no runner will use it
        services.runner_job_update(
            job_id=job.id, result={**job.result, "failed": True, "error": str(exc)[:500]}, stopped_at=db_now()
        )
        return False
    services.runner_job_update(
        job_id=job.id,
        namespace=launched.namespace,
        job_name=launched.job_name,
        image=launched.image,
        result={**job.result, "launched": True, **launched.details},
    )
    if launched.details.get("pvcCreated") and spec.session_id:
        # The launcher made the session a volume: the session learns of it (and GC can find it).
        try:
            session_services.session_storage_refresh(
                session_id=spec.session_id,
                storage_kind=StorageKind.PVC,
                pvc_name=launched.details["pvc"],
                namespace=launched.namespace,
            )
        except AgentRunError:
            logger.warning(
                "session %s is gone; nothing will collect its new volume %s", spec.session_id, launched.details["pvc"]
            )
    logger.info("started runner %s for run %s (%s/%s)", runner_id, run_id, launched.namespace, launched.job_name)
    return True


def _launch_bundle(run: Run) -> Bundle | None:
    """The run's resource bundle as the launcher takes it; LookupError when it was deleted since
    the run was created."""
    if run.resource_bundle is None:
        return None
    bundle = ResourceBundle.objects.filter(tenant_id=run.tenant_id, name=run.resource_bundle).first()
    if bundle is None:
        raise LookupError(f"resource bundle {run.resource_bundle!r} no longer exists")
    return Bundle(
        name=bundle.name,
        env=tuple(SecretEnv(name=item["name"], secret=item["secret"], key=item["key"]) for item in bundle.env),
        env_from=tuple(bundle.env_from),
        image=bundle.image,
        cpu=bundle.cpu,
        memory=bundle.memory,
        runtime_class_name=bundle.runtime_class_name,
        node_selector=tuple(sorted(bundle.node_selector.items())),
        egress_allowlist=tuple(bundle.egress_allowlist),
    )


def _git_workspace(run: Run) -> bool:
    return isinstance(run.workspace_ref, dict) and run.workspace_ref.get("kind") == "git"


def _timeout_seconds(run: Run) -> float | None:
    timeout = (run.execution_policy or {}).get("timeoutSeconds") if isinstance(run.execution_policy, dict) else None
    return float(timeout) if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) else None


def _session_storage(run: Run) -> dict:
    if not run.session_id:
        return {}
    session = (
        Session.objects.filter(pk=run.session_id).only("storage_kind", "storage_pvc_name", "storage_namespace").first()
    )
    if session is None or session.storage_kind != StorageKind.PVC or not session.storage_pvc_name:
        return {}
    return {"pvc_name": session.storage_pvc_name, "pvc_namespace": session.storage_namespace}


def stop_finished(launcher: Launcher, *, limit: int = 100) -> int:
    """Stop the runners (Jobs, processes) still recorded live for runs that ended."""
    if launcher.name == "none":
        return 0
    stopped = 0
    jobs = RunnerJob.objects.filter(stopped_at__isnull=True, run__status__in=RUN_TERMINAL).order_by("updated_at")[
        :limit
    ]
    for job in jobs:
        launched = (job.result or {}).get("launched")  # else recorded by a runner itself, or never started
        if launched:
            try:
                launcher.stop(_job_view(job))
            except Exception:
                logger.exception("stopping runner job %s failed", job.id)
                continue
            stopped += 1
        if (job.result or {}).get("keyId"):
            api_key_revoke(key_ids=[job.result["keyId"]])
        services.runner_job_update(job_id=job.id, stopped_at=db_now())
    return stopped
