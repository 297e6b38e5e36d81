"""The Kubernetes launcher: a Job per run attempt, through the official client.

- The Job runs the runner image with the manager URL and the run id; the run-scoped runner key
  comes from a Secret created with the Job as its owner, so deleting the Job deletes it.
- The session's PVC is mounted at /var/lib/agentrun/session (HOME and CODEX_HOME live there,
  so an agent CLI can resume its thread in the next run) and the workspace is its `workspace`
  directory, so a session's later runs find the same tree; when the backend resumes threads and
  the session has no volume yet, the launcher creates one. Without a volume the workspace and
  HOME are emptyDirs.
- The pod is hardened: non-root, no privilege escalation, no capabilities, the runtime's seccomp
  profile and a read-only root; only the workspace, HOME and /tmp are writable. A run with a
  timeout gets a Job deadline (the timeout plus AGENTRUN_RUNNER_DEADLINE_GRACE_SECONDS).
- A run's resource bundle chooses the image, resources, runtime class and nodes, and names the
  secrets the runner's environment takes (references only: no secret value is in the Job). Its
  egress allowlist becomes a NetworkPolicy per bundle, which adds to deploy/'s base policy
  (the manager and DNS only).
- The same attempt twice is one Job: its name is derived from the run and the attempt, and a
  409 AlreadyExists reads the existing one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re

from django.conf import settings
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from agentrun import kube
from agentrun.launcher import Bundle, Launched, Launcher, LaunchSpec, egress_target

APP_LABEL = "agentrun-runner"
RUN_LABEL = "agentrun.io/run-id"
BUNDLE_LABEL = "agentrun.io/bundle"
SESSION_MOUNT = "/var/lib/agentrun/session"
# The workspace (the runner's --workdir): in the session's volume when there is one.
SESSION_WORKSPACE = f"{SESSION_MOUNT}/workspace"
WORKSPACE = "/workspace"
HOME = "/home/agentrun"
RUNNER_UID = 1000  # the image's user (deploy/Dockerfile: USER 1000)


def _dns_name(prefix: str, value: str, limit: int = 63) -> str:
    """A DNS-1123 name from arbitrary ids: lowercased, cleaned, and a hash to keep it unique."""
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    clean = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")
    return f"{prefix}-{clean}"[: limit - 11].rstrip("-") + f"-{digest}"


def _label_value(value: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:63].strip("-_.")
    return clean or "none"


def _bundle_key(tenant_id: str, name: str) -> str:
    # JSON, so that no two (tenant, name) pairs share a key, whatever characters they hold.
    return json.dumps([tenant_id, name], ensure_ascii=False)


def bundle_label(tenant_id: str, name: str) -> str:
    """The pod label of the tenant's bundle: a cleaned `tenant-name` and a hash of both. Bundle
    names are the tenant's own, so two tenants' bundles of one name, like any two bundles, never
    share a label, and never each other's egress."""
    key = _bundle_key(tenant_id, name)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{tenant_id}-{name}")[:52].strip("-_.")
    return f"{clean}-{digest}" if clean else digest


def bundle_policy_name(tenant_id: str, name: str) -> str:
    """The bundle's NetworkPolicy: `agentrun-bundle-<tenant>-<name>-<hash of both>`."""
    digest = hashlib.sha256(_bundle_key(tenant_id, name).encode()).hexdigest()[:10]
    clean = re.sub(r"[^a-z0-9-]+", "-", f"{tenant_id}-{name}".lower()).strip("-")
    return f"agentrun-bundle-{clean}"[:52].rstrip("-") + f"-{digest}"


def egress_rules(allowlist: tuple[str, ...]) -> list[client.V1NetworkPolicyEgressRule]:
    """One egress rule per allowlist entry: to its CIDR on any port, or TCP to its port. A bad
    entry is a ValueError: a bad allowlist starts no runner."""
    rules = []
    for entry in allowlist:
        cidr, port = egress_target(entry)
        rules.append(
            client.V1NetworkPolicyEgressRule(
                to=[client.V1NetworkPolicyPeer(ip_block=client.V1IPBlock(cidr=cidr))],
                ports=None if port is None else [client.V1NetworkPolicyPort(protocol="TCP", port=port)],
            )
        )
    return rules


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

    @property
    def networking(self) -> client.NetworkingV1Api:
        return client.NetworkingV1Api(kube.api_client())

    # --- launch ------------------------------------------------------------------------------

    def launch(self, spec: LaunchSpec) -> Launched:
        image = (spec.bundle and spec.bundle.image) or self.image
        if not image:
            raise ValueError("the kubernetes launcher needs AGENTRUN_RUNNER_IMAGE (the runner's container image)")
        name = job_name(spec)
        namespace = spec.pvc_namespace or self.namespace
        if spec.bundle is not None:
            # Before the Job: its pod starts with its egress allowed, and only that.
            self._apply_bundle_policy(spec.tenant_id, spec.bundle, namespace)
        pvc, created_pvc = spec.pvc_name, False
        if pvc is None and spec.needs_storage and spec.session_id:
            pvc, created_pvc = session_pvc_name(spec.session_id), self._ensure_pvc(spec.session_id, namespace)
        job = self._create_job(spec, name, namespace, pvc, image)
        uid = job.metadata.uid if job.metadata is not None else None
        if uid is None:
            raise kube.KubeError(f"creating Job {namespace}/{name}: the API server answered without a uid")
        self._create_secret(spec, name, namespace, uid)
        return Launched(
            namespace=namespace,
            job_name=name,
            image=image,
            details={"uid": uid, "secret": name, "pvc": pvc, "pvcCreated": created_pvc},
        )

    def _labels(self, spec: LaunchSpec) -> dict:
        labels = {
            "app.kubernetes.io/name": APP_LABEL,
            "app.kubernetes.io/managed-by": "agentrun",
            RUN_LABEL: _label_value(spec.run_id),
            "agentrun.io/attempt": str(spec.attempt),
        }
        if spec.bundle is not None:
            labels[BUNDLE_LABEL] = bundle_label(spec.tenant_id, spec.bundle.name)
        return labels

    def _apply_bundle_policy(self, tenant_id: str, bundle: Bundle, namespace: str) -> None:
        """The bundle's NetworkPolicy: its runner pods may also reach exactly its allowlist.
        Created, or replaced when it exists (the bundle's allowlist may have changed); deleted
        when the allowlist is empty (it may have been emptied)."""
        name = bundle_policy_name(tenant_id, bundle.name)
        label = bundle_label(tenant_id, bundle.name)
        timeout = kube.REQUEST_TIMEOUT_SECONDS
        if not bundle.egress_allowlist:
            self.delete_policy(namespace, name)
            return
        body = client.V1NetworkPolicy(
            api_version="networking.k8s.io/v1",
            kind="NetworkPolicy",
            metadata=client.V1ObjectMeta(
                name=name, labels={"app.kubernetes.io/managed-by": "agentrun", BUNDLE_LABEL: label}
            ),
            spec=client.V1NetworkPolicySpec(
                pod_selector=client.V1LabelSelector(
                    match_labels={"app.kubernetes.io/name": APP_LABEL, BUNDLE_LABEL: label}
                ),
                policy_types=["Egress"],
                egress=egress_rules(bundle.egress_allowlist),
            ),
        )
        try:
            self.networking.create_namespaced_network_policy(namespace, body, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status != 409:
                raise kube.KubeError(f"creating NetworkPolicy {namespace}/{name}: HTTP {exc.status}") from None
            try:
                self.networking.replace_namespaced_network_policy(name, namespace, body, _request_timeout=timeout)
            except ApiException as again:
                raise kube.KubeError(f"replacing NetworkPolicy {namespace}/{name}: HTTP {again.status}") from None

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

    def _create_job(self, spec: LaunchSpec, name: str, namespace: str, pvc: str | None, image: str) -> client.V1Job:
        bundle = spec.bundle or Bundle(name="")
        mounts = [client.V1VolumeMount(name="tmp", mount_path="/tmp")]  # noqa: S108 - the pod's own emptyDir
        volumes = [client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource())]
        if pvc:
            workdir, home = SESSION_WORKSPACE, SESSION_MOUNT
            mounts.append(client.V1VolumeMount(name="session", mount_path=SESSION_MOUNT))
            volumes.append(
                client.V1Volume(
                    name="session", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(claim_name=pvc)
                )
            )
        else:
            workdir, home = WORKSPACE, HOME
            for volume, path in (("workspace", WORKSPACE), ("home", HOME)):
                mounts.append(client.V1VolumeMount(name=volume, mount_path=path))
                volumes.append(client.V1Volume(name=volume, empty_dir=client.V1EmptyDirVolumeSource()))
        env = [
            client.V1EnvVar(name="AGENTRUN_URL", value=spec.manager_url),
            client.V1EnvVar(name="AGENTRUN_RUN_ID", value=spec.run_id),
            client.V1EnvVar(
                name="AGENTRUN_RUNNER_KEY",
                value_from=client.V1EnvVarSource(
                    secret_key_ref=client.V1SecretKeySelector(name=name, key="runner-key")
                ),
            ),
            client.V1EnvVar(name="HOME", value=home),
        ]
        if pvc:
            env.append(client.V1EnvVar(name="CODEX_HOME", value=f"{SESSION_MOUNT}/codex"))
        # The bundle's secrets, by reference. A name the launcher sets is the launcher's.
        reserved = {item.name for item in env}
        env += [
            client.V1EnvVar(
                name=item.name,
                value_from=client.V1EnvVarSource(
                    secret_key_ref=client.V1SecretKeySelector(name=item.secret, key=item.key)
                ),
            )
            for item in bundle.env
            if item.name not in reserved
        ]
        env_from = [client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name=item)) for item in bundle.env_from]
        resources = {
            "cpu": bundle.cpu or settings.AGENTRUN_RUNNER_CPU,
            "memory": bundle.memory or settings.AGENTRUN_RUNNER_MEMORY,
        }
        deadline = None
        if spec.timeout_seconds is not None:
            deadline = max(1, math.ceil(spec.timeout_seconds) + settings.AGENTRUN_RUNNER_DEADLINE_GRACE_SECONDS)
        runtime_default = client.V1SeccompProfile(type="RuntimeDefault")
        body = client.V1Job(
            api_version="batch/v1",
            kind="Job",
            metadata=client.V1ObjectMeta(name=name, labels=self._labels(spec)),
            spec=client.V1JobSpec(
                backoff_limit=0,  # a retry is a new attempt, decided by agentrun, not by Kubernetes
                ttl_seconds_after_finished=3600,
                active_deadline_seconds=deadline,
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=self._labels(spec)),
                    spec=client.V1PodSpec(
                        restart_policy="Never",
                        service_account_name=settings.AGENTRUN_RUNNER_SERVICE_ACCOUNT,
                        automount_service_account_token=False,
                        runtime_class_name=bundle.runtime_class_name or None,
                        node_selector=dict(bundle.node_selector) or None,
                        security_context=client.V1PodSecurityContext(
                            run_as_non_root=True,
                            run_as_user=RUNNER_UID,
                            run_as_group=RUNNER_UID,
                            fs_group=RUNNER_UID,
                            seccomp_profile=runtime_default,
                        ),
                        containers=[
                            client.V1Container(
                                name="runner",
                                image=image,
                                args=["python", *spec.runner_args(workdir)],
                                env=env,
                                env_from=env_from or None,
                                volume_mounts=mounts,
                                resources=client.V1ResourceRequirements(requests=resources, limits=resources),
                                security_context=client.V1SecurityContext(
                                    allow_privilege_escalation=False,
                                    capabilities=client.V1Capabilities(drop=["ALL"]),
                                    seccomp_profile=runtime_default,
                                    run_as_non_root=True,
                                    run_as_user=RUNNER_UID,
                                    run_as_group=RUNNER_UID,
                                    read_only_root_filesystem=True,
                                ),
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

    def list_pods(self, job: dict) -> list[client.V1Pod]:
        """The pods of the runner Job recorded as `job` (runId, namespace, jobName): those with
        its run's label and the Job's `job-name`, which the Job controller sets."""
        selector = f"{RUN_LABEL}={_label_value(job['runId'])},job-name={job['jobName']}"
        try:
            return self.core.list_namespaced_pod(
                job["namespace"], label_selector=selector, _request_timeout=kube.REQUEST_TIMEOUT_SECONDS
            ).items
        except ApiException as exc:
            raise kube.KubeError(
                f"listing the pods of Job {job['namespace']}/{job['jobName']}: HTTP {exc.status}"
            ) from None

    def delete_policy(self, namespace: str, name: str) -> None:
        """Delete a bundle's NetworkPolicy (gone already is fine)."""
        try:
            self.networking.delete_namespaced_network_policy(
                name,
                namespace,
                body=client.V1DeleteOptions(),
                _headers={"Content-Type": "application/json"},
                _request_timeout=kube.REQUEST_TIMEOUT_SECONDS,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise kube.KubeError(f"deleting NetworkPolicy {namespace}/{name}: HTTP {exc.status}") from None

    def list_bundle_policies(self) -> list[client.V1NetworkPolicy]:
        """The bundles' NetworkPolicies the launcher made in its namespace."""
        try:
            return self.networking.list_namespaced_network_policy(
                self.namespace,
                label_selector=f"app.kubernetes.io/managed-by=agentrun,{BUNDLE_LABEL}",
                _request_timeout=kube.REQUEST_TIMEOUT_SECONDS,
            ).items
        except ApiException as exc:
            raise kube.KubeError(f"listing NetworkPolicies in {self.namespace}: HTTP {exc.status}") from None

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
