"""The Kubernetes launcher and the reconciler against a fake API server that validates every
body against the Kubernetes schema; and against a real cluster when KUBECONFIG is set."""

from __future__ import annotations

import base64
import io
import json
import os
import re

import pytest
from django.core.management import call_command

from agentrun.launcher import Bundle, LaunchSpec, SecretEnv, egress_target
from agentrun.launcher.kubernetes import (
    KubernetesLauncher,
    bundle_label,
    bundle_policy_name,
    job_name,
    session_pvc_name,
)
from runs import launching, reconciling, services
from runs.models import ResourceBundle, Run, RunnerJob
from runs.validation import egress_entry
from sessions.models import Session
from tests.helpers import PROJECT, TENANT, claim, make_run

pytestmark = pytest.mark.django_db
NS = "agents"


@pytest.fixture
def k8s(fake_cluster, settings):
    settings.AGENTRUN_NAMESPACE = NS
    settings.AGENTRUN_URL = "http://manager.agents.svc:8000"
    return KubernetesLauncher(image="registry.example.com/agentrun:1.0")


def spec(**fields):
    fields.setdefault("run_id", "run_abc")
    fields.setdefault("attempt", 1)
    fields.setdefault("tenant_id", "acme")
    return LaunchSpec(
        runner_id="kubernetes-run_abc-1",
        runner_key="ar_secret",
        manager_url="http://m:8000",
        backend_profile="echo",
        project_id="web",
        **fields,
    )


def test_a_job_per_attempt_with_its_secret_owned_by_it(k8s, fake_cluster):
    launched = k8s.launch(spec())
    name = job_name(spec())
    assert launched.job_name == name and launched.namespace == NS and launched.details["uid"]
    job = fake_cluster.of("jobs")[name]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/agentrun:1.0"
    assert container["args"][:6] == ["python", "-m", "runner", "--manager", "http://m:8000", "--run"]
    env = {item["name"]: item for item in container["env"]}
    assert env["AGENTRUN_RUNNER_KEY"]["valueFrom"]["secretKeyRef"] == {"name": name, "key": "runner-key"}
    assert "value" not in env["AGENTRUN_RUNNER_KEY"]  # the key is not in the Job
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "agentrun-runner"
    secret = fake_cluster.of("secrets")[name]
    assert secret["stringData"] == {"runner-key": "ar_secret"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert not fake_cluster.of("persistentvolumeclaims")  # echo keeps no thread state


def test_the_same_attempt_twice_is_one_job(k8s, fake_cluster):
    first = k8s.launch(spec())
    again = k8s.launch(spec())
    assert again.details["uid"] == first.details["uid"] and len(fake_cluster.of("jobs")) == 1
    k8s.launch(spec(attempt=2))
    assert len(fake_cluster.of("jobs")) == 2


def test_a_backend_that_resumes_gets_a_session_volume(k8s, fake_cluster):
    launched = k8s.launch(spec(session_id="Sess/1", needs_storage=True))
    pvc = session_pvc_name("Sess/1")
    assert launched.details == {**launched.details, "pvc": pvc, "pvcCreated": True}
    claim_body = fake_cluster.of("persistentvolumeclaims")[pvc]
    assert claim_body["spec"]["resources"]["requests"]["storage"] == "5Gi"
    pod = fake_cluster.of("jobs")[launched.job_name]["spec"]["template"]["spec"]
    assert pod["volumes"][1]["persistentVolumeClaim"]["claimName"] == pvc
    assert {"name": "HOME", "value": "/var/lib/agentrun/session"} in pod["containers"][0]["env"]
    second = k8s.launch(spec(session_id="Sess/1", needs_storage=True, attempt=2))
    assert second.details["pvcCreated"] is False  # the session's volume already exists
    existing = k8s.launch(spec(run_id="run_x", session_id="s2", pvc_name="their-pvc", pvc_namespace="other"))
    assert existing.namespace == "other" and existing.details["pvc"] == "their-pvc"


HARDENED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "readOnlyRootFilesystem": True,
}
BUNDLE = Bundle(
    name="gpu-sandbox",
    env=(SecretEnv("OPENAI_API_KEY", "llm-keys", "openai"), SecretEnv("GITHUB_TOKEN", "forge", "token")),
    env_from=("agent-extra",),
    image="registry.example.com/agentrun-gpu:2.0",
    cpu="2",
    memory="4Gi",
    runtime_class_name="gvisor",
    node_selector=(("agentrun.io/pool", "sandbox"),),
    egress_allowlist=("10.20.0.0/16", "203.0.113.7/32:443"),
)


def _pod(fake_cluster, name):
    return fake_cluster.of("jobs")[name]["spec"]["template"]["spec"]


def _writable(pod):
    """Mount path -> the volume behind it: what the runner may write (the root is read-only)."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    return {mount["mountPath"]: volumes[mount["name"]] for mount in pod["containers"][0]["volumeMounts"]}


def test_the_runner_pod_is_hardened_and_writes_only_its_workspace_home_and_tmp(k8s, fake_cluster):
    launched = k8s.launch(spec())
    job = fake_cluster.of("jobs")[launched.job_name]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"] == HARDENED
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False
    assert _writable(pod) == {
        "/tmp": {"name": "tmp", "emptyDir": {}},
        "/workspace": {"name": "workspace", "emptyDir": {}},
        "/home/agentrun": {"name": "home", "emptyDir": {}},
    }
    assert container["args"][-2:] == ["--workdir", "/workspace"]
    assert {"name": "HOME", "value": "/home/agentrun"} in container["env"]
    assert container["resources"]["limits"] == {"cpu": "500m", "memory": "1Gi"}
    for absent in ("runtimeClassName", "nodeSelector"):
        assert absent not in pod
    assert "envFrom" not in container and "activeDeadlineSeconds" not in job["spec"]
    assert "agentrun.io/bundle" not in job["metadata"]["labels"]
    assert not fake_cluster.of("networkpolicies")


def test_with_a_session_volume_home_and_the_workspace_are_on_it(k8s, fake_cluster):
    launched = k8s.launch(spec(session_id="s1", pvc_name="agentrun-session-s1", pvc_namespace=NS))
    pod = _pod(fake_cluster, launched.job_name)
    assert _writable(pod) == {
        "/tmp": {"name": "tmp", "emptyDir": {}},
        "/var/lib/agentrun/session": {
            "name": "session",
            "persistentVolumeClaim": {"claimName": "agentrun-session-s1"},
        },
    }  # nothing at /workspace: a session's later runs find the tree on the volume
    container = pod["containers"][0]
    assert container["args"][-2:] == ["--workdir", "/var/lib/agentrun/session/workspace"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["HOME"] == "/var/lib/agentrun/session" and env["CODEX_HOME"] == "/var/lib/agentrun/session/codex"


def test_a_bundle_and_a_timeout_shape_the_job_by_reference(k8s, fake_cluster):
    launched = k8s.launch(spec(session_id="s1", pvc_name="agentrun-session-s1", bundle=BUNDLE, timeout_seconds=600))
    assert launched.image == "registry.example.com/agentrun-gpu:2.0"  # the RunnerJob records it
    job = fake_cluster.of("jobs")[launched.job_name]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["spec"]["activeDeadlineSeconds"] == 600 + 300
    assert container["image"] == "registry.example.com/agentrun-gpu:2.0"
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert pod["runtimeClassName"] == "gvisor" and pod["nodeSelector"] == {"agentrun.io/pool": "sandbox"}
    assert container["envFrom"] == [{"secretRef": {"name": "agent-extra"}}]
    env = {item["name"]: item for item in container["env"]}
    assert env["OPENAI_API_KEY"] == {
        "name": "OPENAI_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "llm-keys", "key": "openai"}},
    }
    assert env["GITHUB_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "forge", "key": "token"}}
    assert container["securityContext"] == HARDENED
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["agentrun.io/bundle"] == bundle_label("acme", "gpu-sandbox")
    assert "ar_secret" not in json.dumps(job)  # the runner key is in its Secret, by reference

    policy = fake_cluster.of("networkpolicies")[bundle_policy_name("acme", "gpu-sandbox")]
    assert policy["metadata"]["namespace"] == NS
    assert policy["spec"] == {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "agentrun-runner",
                "agentrun.io/bundle": bundle_label("acme", "gpu-sandbox"),
            }
        },
        "policyTypes": ["Egress"],
        "egress": [
            {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]},
            {"to": [{"ipBlock": {"cidr": "203.0.113.7/32"}}], "ports": [{"protocol": "TCP", "port": 443}]},
        ],
    }
    # The bundle's allowlist changed: the next launch replaces its policy.
    narrower = Bundle(name="gpu-sandbox", egress_allowlist=("[2001:db8::/32]:8443", "192.0.2.9", "2001:db8:1::/48"))
    k8s.launch(spec(run_id="run_2", bundle=narrower, timeout_seconds=0.5))
    assert ("PUT", "networkpolicies") in {(verb, plural) for verb, plural, _ in fake_cluster.requests}
    assert fake_cluster.of("networkpolicies")[bundle_policy_name("acme", "gpu-sandbox")]["spec"]["egress"] == [
        {"to": [{"ipBlock": {"cidr": "2001:db8::/32"}}], "ports": [{"protocol": "TCP", "port": 8443}]},
        {"to": [{"ipBlock": {"cidr": "192.0.2.9/32"}}]},
        {"to": [{"ipBlock": {"cidr": "2001:db8:1::/48"}}]},
    ]
    # Emptied: its policy goes, and the runners keep only the manager and DNS (deploy/).
    k8s.launch(spec(run_id="run_3", bundle=Bundle(name="gpu-sandbox")))
    assert not fake_cluster.of("networkpolicies")
    second = fake_cluster.of("jobs")[job_name(spec(run_id="run_2"))]
    assert second["spec"]["activeDeadlineSeconds"] == 1 + 300  # a part second is a second
    assert second["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/agentrun:1.0"


def test_a_bundle_cannot_take_the_launchers_variables(k8s, fake_cluster):
    bundle = Bundle(name="b", env=(SecretEnv("HOME", "s", "k"), SecretEnv("AGENTRUN_RUNNER_KEY", "s", "k")))
    launched = k8s.launch(spec(bundle=bundle))
    env = _pod(fake_cluster, launched.job_name)["containers"][0]["env"]
    names = [item["name"] for item in env]
    assert len(names) == len(set(names))
    assert {"name": "HOME", "value": "/home/agentrun"} in env


def test_bundle_names_become_distinct_labels_and_policy_names():
    """A bundle's name is its tenant's: the same name in two tenants is two labels and two
    policies, so neither tenant's runners get the other's egress."""
    keys = [("acme", "gpu-sandbox"), ("other", "gpu-sandbox"), ("acme", "GPU Sandbox!"), ("acme", "GPU-Sandbox-")]
    keys += [("acme", "x" * 80), ("acme", "日本"), ("acme/x", "y"), ("acme", "x/y")]
    labels = [bundle_label(*key) for key in keys]
    assert len(set(labels)) == len(keys) and labels[0].startswith("acme-gpu-sandbox-")
    for label in labels:
        assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?", label), label
    policies = [bundle_policy_name(*key) for key in keys]
    assert len(set(policies)) == len(keys)
    for name in policies:
        assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name)


def test_two_tenants_bundles_of_one_name_keep_their_own_egress(k8s, fake_cluster):
    ours = Bundle(name="agents", egress_allowlist=("10.1.0.0/16",))
    theirs = Bundle(name="agents", egress_allowlist=("10.2.0.0/16",))
    launched = [
        k8s.launch(spec(run_id="run_a", bundle=ours)),
        k8s.launch(spec(run_id="run_b", bundle=theirs, tenant_id="other")),
    ]
    policies = fake_cluster.of("networkpolicies")
    assert len(policies) == 2
    for job, bundle in zip(launched, (ours, theirs), strict=True):
        labels = fake_cluster.of("jobs")[job.job_name]["spec"]["template"]["metadata"]["labels"]
        [policy] = [p for p in policies.values() if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert policy["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": bundle.egress_allowlist[0]}}]}]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("10.0.0.0/8", ("10.0.0.0/8", None)),
        ("203.0.113.7/32:443", ("203.0.113.7/32", 443)),
        ("203.0.113.7", ("203.0.113.7/32", None)),
        ("203.0.113.7:22", ("203.0.113.7/32", 22)),
        ("10.1.2.3/8", ("10.0.0.0/8", None)),
        ("::/0", ("::/0", None)),
        ("[2001:db8::/32]:443", ("2001:db8::/32", 443)),
        ("[2001:db8::1]:8443", ("2001:db8::1/128", 8443)),
        ("10.0.0.0/33", None),
        ("10.0.0.0/8:0", None),
        ("10.0.0.0/8:99999", None),
        ("2001:db8::/32:443", None),
        ("x/8", None),
    ],
)
def test_allowlist_entries_as_the_bundle_validation_and_the_launcher_read_them(entry, expected):
    """One parser (agentrun.launcher.egress_target) for the admin's validation and the launch."""
    assert egress_entry(entry) == expected
    if expected is None:
        with pytest.raises(ValueError):
            egress_target(entry)
    else:
        assert egress_target(entry) == expected


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "10.0.0.0/8:0", "10.0.0.0/8:99999", "example.com/8"])
def test_a_bad_allowlist_starts_no_runner(k8s, fake_cluster, entry):
    with pytest.raises(ValueError, match="allowlist"):
        k8s.launch(spec(bundle=Bundle(name="b", egress_allowlist=(entry,))))
    assert not fake_cluster.requests


def test_alive_and_stop(k8s, fake_cluster):
    launched = k8s.launch(spec())
    view = {"namespace": NS, "jobName": launched.job_name}
    assert k8s.alive(view)
    fake_cluster.set_job_status(NS, launched.job_name, {"failed": 1})
    assert not k8s.alive(view)
    k8s.stop(view)
    assert not fake_cluster.of("jobs") and not fake_cluster.of("secrets")  # the Secret goes with its Job
    k8s.stop(view)  # already gone: fine
    assert not k8s.alive(view)


def test_the_worker_launches_a_job_and_records_it(k8s, fake_cluster):
    run = make_run(session_id="k8s-s1", backend="codex")
    assert launching.launch_pending(k8s) == 1
    job = RunnerJob.objects.get(run_id=run.id)
    assert (job.namespace, job.image) == (NS, "registry.example.com/agentrun:1.0")
    assert job.job_name in fake_cluster.of("jobs") and job.result["launched"]
    session = Session.objects.get(pk="k8s-s1")
    assert (session.storage_kind, session.storage_pvc_name, session.storage_namespace) == (
        "pvc",
        session_pvc_name("k8s-s1"),
        NS,
    )  # GC will find the volume
    secret = fake_cluster.of("secrets")[job.job_name]["stringData"]["runner-key"]
    from agentrun.auth import hash_key
    from agentrun.models import ApiKey

    assert ApiKey.objects.get(key_hash=hash_key(secret)).run_id == run.id
    assert launching.launch_pending(k8s) == 0  # its Job is alive
    services.run_cancel(run_id=run.id)
    assert launching.stop_finished(k8s) == 1
    assert job.job_name not in fake_cluster.of("jobs")  # a cancelled run's Job is deleted


def test_reconciler_fails_runs_whose_job_failed_or_vanished_and_deletes_orphan_jobs(k8s, fake_cluster):
    failed, vanished, healthy, done = (make_run() for _ in range(4))
    for run in (failed, vanished, healthy, done):
        launching.launch_pending(k8s)
        claim(run)
    jobs = {job.run_id: job for job in RunnerJob.objects.all()}
    fake_cluster.set_job_status(
        NS,
        jobs[failed.id].job_name,
        {
            "failed": 1,
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "pod OOMKilled"}
            ],
        },
    )
    del fake_cluster.objects[("jobs", NS, jobs[vanished.id].job_name)]
    services.run_cancel(run_id=done.id)
    out = io.StringIO()
    call_command("reconcile", "--dry-run", stdout=out)
    assert "would fail run " + failed.id in out.getvalue() and "dry run: 3 finding(s)" in out.getvalue()
    assert Run.objects.get(pk=failed.id).status == "claimed"
    findings = reconciling.reconcile(k8s)
    assert sorted((f.action, f.run_id) for f in findings) == sorted(
        [("fail-run", failed.id), ("fail-run", vanished.id), ("delete-job", done.id), ("delete-job", failed.id)]
    )  # its run ended a moment ago: the failed Job goes in the same pass
    assert Run.objects.get(pk=failed.id).failure_kind == "runner-lost"
    assert "OOMKilled" in Run.objects.get(pk=failed.id).failure_message
    assert Run.objects.get(pk=vanished.id).status == "failed"
    assert Run.objects.get(pk=healthy.id).status == "claimed"
    assert set(fake_cluster.of("jobs")) == {jobs[healthy.id].job_name}
    assert reconciling.reconcile(k8s) == []


def test_the_launcher_needs_an_image(settings, fake_cluster):
    settings.AGENTRUN_RUNNER_IMAGE = ""
    with pytest.raises(ValueError):
        KubernetesLauncher().launch(spec())
    assert not fake_cluster.requests


@pytest.mark.k8s
def test_a_job_on_a_real_cluster():
    """Launches a Job running the image in AGENTRUN_TEST_RUNNER_IMAGE (default busybox-like
    `python:3.11-slim`, which fails fast without a manager) in AGENTRUN_TEST_NAMESPACE, then stops it."""
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("needs a real cluster: set KUBECONFIG to run it")
    from agentrun import kube

    kube.reset()
    launcher = KubernetesLauncher(
        namespace=os.environ.get("AGENTRUN_TEST_NAMESPACE", "default"),
        image=os.environ.get("AGENTRUN_TEST_RUNNER_IMAGE", "python:3.11-slim"),
    )
    name = base64.b32encode(os.urandom(5)).decode().lower()
    launched = launcher.launch(spec(run_id=f"run_{name}"))
    view = {"namespace": launched.namespace, "jobName": launched.job_name}
    assert launcher.read(view) is not None
    launcher.stop(view)


def test_the_fake_refuses_what_the_schema_refuses(k8s, fake_cluster, fake_kube):
    import httpx

    from tests.helpers import TOKEN

    bad = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "bad"},
        "spec": {"template": {"spec": {"containers": [{"name": "x", "image": "i", "bogusField": 1}]}}},
    }
    response = httpx.post(
        fake_kube.server.url_for(f"/apis/batch/v1/namespaces/{NS}/jobs"),
        json=bad,
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 422 and not fake_cluster.of("jobs")
    assert fake_kube.problems and "schema" in fake_kube.problems[0]
    fake_kube.problems.clear()


def test_a_job_past_its_deadline_times_its_run_out(k8s, fake_cluster):
    run = make_run(execution_policy={"timeoutSeconds": 60})
    launching.launch_pending(k8s)
    claim(run)
    job = RunnerJob.objects.get(run_id=run.id)
    fake_cluster.set_job_status(
        NS,
        job.job_name,
        {
            "failed": 1,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "DeadlineExceeded",
                    "message": "Job was active longer than specified deadline",
                }
            ],
        },
    )
    [finding, _] = reconciling.reconcile(k8s)
    assert (finding.kind, finding.reason) == ("timeout", "DeadlineExceeded")
    stored = Run.objects.get(pk=run.id)
    assert (stored.status, stored.terminal_status, stored.failure_kind) == ("failed", "timeout", "timeout")
    assert "longer than specified deadline" in stored.failure_message


def test_a_git_run_with_a_bundle_through_the_worker_becomes_a_hardened_job(k8s, fake_cluster, client_api):
    """A client's run, as the API takes it, through the worker's launch pass: the Job checks the
    repository out onto the session's volume, with the bundle's secrets by reference only."""
    ResourceBundle.objects.create(
        tenant_id=TENANT,
        name="agents",
        env=[
            {"name": "OPENAI_API_KEY", "secret": "llm-keys", "key": "openai"},
            {"name": "GIT_TOKEN", "secret": "forge", "key": "token"},
        ],
        runtime_class_name="gvisor",
        egress_allowlist=["140.82.112.0/20:443"],
    )
    status, run = client_api.post(
        "runs",
        {
            "tenantId": TENANT,
            "projectId": PROJECT,
            "backendProfile": "codex",
            "sessionRef": {"sessionId": "fix-1"},
            "resourceBundleRef": {"kind": "bundle", "name": "agents"},
            "workspaceRef": {"kind": "git", "url": "https://github.com/team/app.git", "credentialsRef": "GIT_TOKEN"},
            "executionPolicy": {"timeoutSeconds": 600},
        },
    )
    assert status == 201, run
    assert launching.launch_pending(k8s) == 1
    job = RunnerJob.objects.get(run_id=run["id"])
    body = fake_cluster.of("jobs")[job.job_name]
    pod = body["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][-2:] == ["--workdir", "/var/lib/agentrun/session/workspace"]
    assert {"name": "session", "persistentVolumeClaim": {"claimName": session_pvc_name("fix-1")}} in pod["volumes"]
    env = {item["name"]: item for item in container["env"]}
    assert env["GIT_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "forge", "key": "token"}}
    assert env["OPENAI_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "llm-keys", "key": "openai"}}
    assert body["spec"]["activeDeadlineSeconds"] == 900 and pod["runtimeClassName"] == "gvisor"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert body["spec"]["template"]["metadata"]["labels"]["agentrun.io/bundle"] == bundle_label(TENANT, "agents")
    (policy,) = fake_cluster.of("networkpolicies").values()
    assert policy["spec"]["egress"] == [
        {"to": [{"ipBlock": {"cidr": "140.82.112.0/20"}}], "ports": [{"protocol": "TCP", "port": 443}]}
    ]


def test_the_reconciler_deletes_the_policies_of_bundles_that_are_gone(k8s, fake_cluster):
    kept = ResourceBundle.objects.create(tenant_id=TENANT, name="kept", egress_allowlist=["10.1.0.0/16"])
    gone = ResourceBundle.objects.create(tenant_id=TENANT, name="gone", egress_allowlist=["10.2.0.0/16"])
    for bundle in (kept, gone):
        make_run(resource_bundle_ref={"kind": "bundle", "name": bundle.name})
        assert launching.launch_pending(k8s) == 1
    assert len(fake_cluster.of("networkpolicies")) == 2
    assert [f for f in reconciling.reconcile(k8s) if f.action == "delete-policy"] == []
    gone.delete()
    out = io.StringIO()
    call_command("reconcile", "--dry-run", stdout=out)
    stale = f"{NS}/{bundle_policy_name(TENANT, 'gone')}"
    assert f"would delete NetworkPolicy {stale}: its bundle is gone" in out.getvalue()
    assert len(fake_cluster.of("networkpolicies")) == 2
    [finding] = [f for f in reconciling.reconcile(k8s) if f.action == "delete-policy"]
    assert finding.job == stale
    assert set(fake_cluster.of("networkpolicies")) == {bundle_policy_name(TENANT, "kept")}
