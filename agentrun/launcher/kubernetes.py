"""The Kubernetes launcher: a Job per run attempt, through the official client.

- The Job runs the runner image with the manager URL and the run id; the run-scoped runner key
  comes from a Secret created with the Job as its owner, so deleting the Job deletes it.
- The session's PVC is mounted at /var/lib/agentrun/session (HOME and CODEX_HOME live there,
  so an agent CLI can resume its thread in the next run); when the backend resumes threads and
  the session has no volume yet, the launcher creates one.
- The same attempt twice is one Job: its name is derived from the run and the attempt, and a
  409 AlreadyExists reads the existing one.
"""

from __future__ import annotations

import hashlib
import re

from django.conf import settings
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from agentrun import kube
from agentrun.launcher import Launched, Launcher, LaunchSpec

APP_LABEL = "agentrun-runner"
RUN_LABEL = "agentrun.io/run-id"
SESSION_MOUNT = "/var/lib/agentrun/session"
WORKSPACE = "/workspace"


def _dns_name(prefix: str, value: str, limit: int = 63) -> str:
    """A DNS-1123 name from arbitrary ids: lowercased, cleaned, and a hash to keep it unique."""
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    clean = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")
    return f"{prefix}-{clean}"[: limit - 11].rstrip("-") + f"-{digest}"


def _label_value(value: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:63].strip("-_.")
    return clean or "none"


def job_name(spec: LaunchSpec) -> str:
    return _dns_name("agentrun", f"{spec.run_id}-{spec.attempt}")


def session_pvc_name(session_id: str) -> str:
    return _dns_name("agentrun-session", session_id)


class KubernetesLauncher(Launcher):
    name = "kubernetes"

    def __init__(self, *, namespace: str | None = None, image: str | None = None):
        self.namespace = namespace or settings.AGENTRUN_NAMESPACE
        self.image = image or settings.AGENTRUN_RUNNER_IMAGE

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(kube.api_client())

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(kube.api_client())

    # --- launch ------------------------------------------------------------------------------

    def launch(self, spec: LaunchSpec) -> Launched:
        if not self.image:
            raise ValueError("the kubernetes launcher needs AGENTRUN_RUNNER_IMAGE (the runner's container image)")
        name = job_name(spec)
        namespace = spec.pvc_namespace or self.namespace
        pvc, created_pvc = spec.pvc_name, False
        if pvc is None and spec.needs_storage and spec.session_id:
            pvc, created_pvc = session_pvc_name(spec.session_id), self._ensure_pvc(spec.session_id, namespace)
        job = self._create_job(spec, name, namespace, pvc)
        uid = job.metadata.uid if job.metadata is not None else None
        if uid is None:
            raise kube.KubeError(f"creating Job {namespace}/{name}: the API server answered without a uid")
        self._create_secret(spec, name, namespace, uid)
        return Launched(
            namespace=namespace,
            job_name=name,
            image=self.image,
            details={"uid": uid, "secret": name, "pvc": pvc, "pvcCreated": created_pvc},
        )

    def _labels(self, spec: LaunchSpec) -> dict:
        return {
            "app.kubernetes.io/name": APP_LABEL,
            "app.kubernetes.io/managed-by": "agentrun",
            RUN_LABEL: _label_value(spec.run_id),
            "agentrun.io/attempt": str(spec.attempt),
        }

    def _ensure_pvc(self, session_id: str, namespace: str) -> bool:
        name = session_pvc_name(session_id)
        body = client.V1PersistentVolumeClaim(
            api_version="v1",
            kind="PersistentVolumeClaim",
            metadata=client.V1ObjectMeta(
                name=name,
                labels={
                    "app.kubernetes.io/managed-by": "agentrun",
                    "agentrun.io/session-id": _label_value(session_id),
                },
            ),
            spec=client.V1PersistentVolumeClaimSpec(
                access_modes=["ReadWriteOnce"],
                storage_class_name=settings.AGENTRUN_SESSION_STORAGE_CLASS,
                resources=client.V1VolumeResourceRequirements(requests={"storage": settings.AGENTRUN_SESSION_PVC_SIZE}),
            ),
        )
        try:
            self.core.create_namespaced_persistent_volume_claim(
                namespace, body, _request_timeout=kube.REQUEST_TIMEOUT_SECONDS
            )
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise kube.KubeError(f"creating PVC {namespace}/{name}: HTTP {exc.status}") from None

    def _create_job(self, spec: LaunchSpec, name: str, namespace: str, pvc: str | None) -> client.V1Job:
        mounts = [client.V1VolumeMount(name="workspace", mount_path=WORKSPACE)]
        volumes = [client.V1Volume(name="workspace", empty_dir=client.V1EmptyDirVolumeSource())]
        env = [
            client.V1EnvVar(name="AGENTRUN_URL", value=spec.manager_url),
            client.V1EnvVar(name="AGENTRUN_RUN_ID", value=spec.run_id),
            client.V1EnvVar(
                name="AGENTRUN_RUNNER_KEY",
                value_from=client.V1EnvVarSource(
                    secret_key_ref=client.V1SecretKeySelector(name=name, key="runner-key")
                ),
            ),
        ]
        if pvc:
            mounts.append(client.V1VolumeMount(name="session", mount_path=SESSION_MOUNT))
            volumes.append(
                client.V1Volume(
                    name="session", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(claim_name=pvc)
                )
            )
            env += [
                client.V1EnvVar(name="HOME", value=SESSION_MOUNT),
                client.V1EnvVar(name="CODEX_HOME", value=f"{SESSION_MOUNT}/codex"),
            ]
        resources = {"cpu": settings.AGENTRUN_RUNNER_CPU, "memory": settings.AGENTRUN_RUNNER_MEMORY}
        body = client.V1Job(
            api_version="batch/v1",
            kind="Job",
            metadata=client.V1ObjectMeta(name=name, labels=self._labels(spec)),
            spec=client.V1JobSpec(
                backoff_limit=0,  # a retry is a new attempt, decided by agentrun, not by Kubernetes
                ttl_seconds_after_finished=3600,
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=self._labels(spec)),
                    spec=client.V1PodSpec(
                        restart_policy="Never",
                        service_account_name=settings.AGENTRUN_RUNNER_SERVICE_ACCOUNT,
                        automount_service_account_token=False,
                        security_context=client.V1PodSecurityContext(run_as_non_root=True, fs_group=1000),
                        containers=[
                            client.V1Container(
                                name="runner",
                                image=self.image,
                                args=["python", *spec.runner_args(WORKSPACE)],
                                env=env,
                                volume_mounts=mounts,
                                resources=client.V1ResourceRequirements(requests=resources, limits=resources),
                            )
                        ],
                        volumes=volumes,
                    ),
                ),
            ),
        )
        try:
            return self.batch.create_namespaced_job(namespace, body, _request_timeout=kube.REQUEST_TIMEOUT_SECONDS)
        except ApiException as exc:
            if exc.status == 409:  # this attempt was launched already: the same Job
                return self.batch.read_namespaced_job(name, namespace, _request_timeout=kube.REQUEST_TIMEOUT_SECONDS)
            raise kube.KubeError(f"creating Job {namespace}/{name}: HTTP {exc.status}") from None

    def _create_secret(self, spec: LaunchSpec, name: str, namespace: str, job_uid: str) -> None:
        body = client.V1Secret(
            api_version="v1",
            kind="Secret",
            type="Opaque",
            metadata=client.V1ObjectMeta(
                name=name,
                labels=self._labels(spec),
                owner_references=[
                    client.V1OwnerReference(
                        api_version="batch/v1", kind="Job", name=name, uid=job_uid, block_owner_deletion=True
                    )
                ],
            ),
            string_data={"runner-key": spec.runner_key},
        )
        try:
            self.core.create_namespaced_secret(namespace, body, _request_timeout=kube.REQUEST_TIMEOUT_SECONDS)
        except ApiException as exc:
            if exc.status != 409:
                raise kube.KubeError(f"creating Secret {namespace}/{name}: HTTP {exc.status}") from None

    # --- the Job's life ----------------------------------------------------------------------

    def read(self, job: dict) -> client.V1Job | None:
        try:
            return self.batch.read_namespaced_job(
                job["jobName"], job["namespace"], _request_timeout=kube.REQUEST_TIMEOUT_SECONDS
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise kube.KubeError(f"reading Job {job['namespace']}/{job['jobName']}: HTTP {exc.status}") from None

    def alive(self, job: dict) -> bool:
        found = self.read(job)
        return found is not None and not job_finished(found)

    def stop(self, job: dict) -> None:
        try:
            self.batch.delete_namespaced_job(
                job["jobName"],
                job["namespace"],
                body=client.V1DeleteOptions(propagation_policy="Background"),
                _headers={"Content-Type": "application/json"},
                _request_timeout=kube.REQUEST_TIMEOUT_SECONDS,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise kube.KubeError(f"deleting Job {job['namespace']}/{job['jobName']}: HTTP {exc.status}") from None

    def list_jobs(self) -> list[client.V1Job]:
        return self.batch.list_namespaced_job(
            self.namespace,
            label_selector=f"app.kubernetes.io/name={APP_LABEL}",
            _request_timeout=kube.REQUEST_TIMEOUT_SECONDS,
        ).items


def job_finished(job: client.V1Job) -> bool:
    status = job.status
    if status is None:
        return False
    return bool(
        status.failed
        or status.succeeded
        or any(
            condition.type in ("Failed", "Complete") and condition.status == "True"
            for condition in status.conditions or []
        )
    )


def job_failed(job: client.V1Job) -> str | None:
    """Why the Job failed, or None."""
    status = job.status
    if status is None:
        return None
    for condition in status.conditions or []:
        if condition.type == "Failed" and condition.status == "True":
            return condition.message or condition.reason or "failed"
    return "its pod failed" if status.failed else None
