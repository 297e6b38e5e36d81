"""deploy/: every Kubernetes manifest validates against the Kubernetes schema, and the pieces
fit together (settings the code reads, the RBAC the launcher needs, one image, the runners' network)."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted(p for p in (DEPLOY / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml")


def documents():
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path.name, document


@pytest.mark.parametrize(("name", "document"), list(documents()), ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_validates_against_the_kubernetes_schema(name, document):
    kubernetes_validate.validate(document, "1.33", strict=True)


def kinds():
    return {(doc["kind"], doc["metadata"]["name"]) for _, doc in documents()}


def test_the_cluster_gets_everything_it_needs():
    needed = {
        ("Deployment", "agentrun-manager"),
        ("Service", "agentrun-manager"),
        ("Deployment", "agentrun-worker"),
        ("Job", "agentrun-migrate"),
        ("CronJob", "agentrun-gc-sessions"),
        ("CronJob", "agentrun-prune"),
        ("Role", "agentrun-launcher"),
        ("RoleBinding", "agentrun-launcher"),
        ("ServiceAccount", "agentrun-manager"),
        ("ServiceAccount", "agentrun-runner"),
        ("ConfigMap", "agentrun"),
        ("NetworkPolicy", "agentrun-runner"),
    }
    assert needed <= kinds()
    listed = set(yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())["resources"])
    assert listed == {path.name for path in MANIFESTS}


def test_the_launcher_role_allows_what_the_launcher_and_gc_do():
    role = next(doc for _, doc in documents() if doc["kind"] == "Role")
    allowed = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for group, resource, verbs in [
        ("batch", "jobs", ["create", "get", "list", "delete"]),
        ("", "secrets", ["create"]),
        ("", "persistentvolumeclaims", ["create", "delete"]),
        ("", "pods", ["get", "list"]),
        ("networking.k8s.io", "networkpolicies", ["create", "update", "delete"]),  # a bundle's egress
    ]:
        for verb in verbs:
            assert (group, resource, verb) in allowed, (group, resource, verb)


def _document(kind, name):
    return next(doc for _, doc in documents() if doc["kind"] == kind and doc["metadata"]["name"] == name)


def test_runners_reach_only_the_manager_and_dns_besides_their_bundles_allowlist(fake_cluster):
    from agentrun.launcher import Bundle, LaunchSpec
    from agentrun.launcher.kubernetes import KubernetesLauncher, bundle_policy_name

    config = _document("ConfigMap", "agentrun")["data"]
    policy = _document("NetworkPolicy", "agentrun-runner")
    assert policy["metadata"]["namespace"] == config["AGENTRUN_NAMESPACE"]  # where the runner Jobs run
    # The labels the launcher gives a runner pod, from the Job it creates.
    launcher = KubernetesLauncher(namespace=config["AGENTRUN_NAMESPACE"], image=config["AGENTRUN_RUNNER_IMAGE"])
    bundle = Bundle(name="sandbox", egress_allowlist=("192.0.2.0/24:443",))
    spec = LaunchSpec(
        run_id="run_1",
        attempt=1,
        runner_id="r",
        runner_key="k",
        manager_url=config["AGENTRUN_URL"],
        backend_profile="echo",
        tenant_id="t",
        project_id="p",
        bundle=bundle,
    )
    launched = launcher.launch(spec)
    runner_labels = fake_cluster.of("jobs")[launched.job_name]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= runner_labels.items()
    bundle_policy = fake_cluster.of("networkpolicies")[bundle_policy_name("t", "sandbox")]
    assert bundle_policy["spec"]["podSelector"]["matchLabels"].items() <= runner_labels.items()
    # No ingress; egress to the manager's pods on their port, and DNS.
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in policy["spec"]
    to_manager, to_dns = policy["spec"]["egress"]
    manager = _document("Deployment", "agentrun-manager")["spec"]["template"]
    (peer,) = to_manager["to"]
    assert peer.keys() == {"podSelector"}  # the manager's pods in the runners' namespace
    assert peer["podSelector"]["matchLabels"].items() <= manager["metadata"]["labels"].items()
    manager_ports = {port["containerPort"] for port in manager["spec"]["containers"][0]["ports"]}
    assert {(port["protocol"], port["port"]) for port in to_manager["ports"]} == {("TCP", p) for p in manager_ports}
    service = _document("Service", "agentrun-manager")
    assert config["AGENTRUN_URL"].endswith(f":{service['spec']['ports'][0]['port']}")
    assert to_dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert {(port["protocol"], port["port"]) for port in to_dns["ports"]} == {("UDP", 53), ("TCP", 53)}


def test_config_names_only_settings_the_code_reads():
    config = next(doc for _, doc in documents() if doc["kind"] == "ConfigMap")
    source = "\n".join(p.read_text() for p in (DEPLOY.parent / "settings").glob("*.py"))
    for variable in config["data"]:
        assert re.search(rf'"{variable}"', source), f"{variable} is not read by settings/"
    assert config["data"]["AGENTRUN_LAUNCHER"] == "kubernetes"


def test_one_image_for_every_workload_and_a_recipe_for_it():
    images = {container["image"] for _, doc in documents() for container in _containers(doc)}
    config = next(doc for _, doc in documents() if doc["kind"] == "ConfigMap")
    assert images == {config["data"]["AGENTRUN_RUNNER_IMAGE"]}
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "requirements.txt" in dockerfile and "USER 1000" in dockerfile
    assert " git " in dockerfile  # a run's git workspace is checked out in the runner's container
    for package in ("agentrun", "sessions", "runs", "queues", "runner", "settings"):
        assert f"COPY {package} {package}" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (DEPLOY.parent / source).exists(), f"the image copies {source}, which does not exist"


def _containers(doc):
    spec = doc.get("spec") or {}
    for template in (spec.get("template"), (spec.get("jobTemplate") or {}).get("spec", {}).get("template")):
        if template:
            yield from template["spec"]["containers"]
