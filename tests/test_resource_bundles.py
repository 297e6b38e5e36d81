"""Resource bundles and git workspace refs on the server: what a run may name at create (400
otherwise, nothing written), what the launcher is handed, and what the local launcher puts in
the runner's environment. Secret values live in the secret store alone."""

from __future__ import annotations

import pytest
from django.contrib.admin.utils import quote
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentrun.errors import AgentRunError
from agentrun.launcher import Bundle, Launcher, SecretEnv
from agentrun.launcher.local import bundle_environment
from queues import services as queue_services
from queues.models import QueueTask
from runs import launching, services
from runs.models import ResourceBundle, Run, RunEvent
from runs.validation import validate_resource_bundle_ref, validate_workspace_ref
from tests.helpers import PROJECT, TENANT, RecordingLauncher, assert_error, make_run

pytestmark = pytest.mark.django_db

GIT = {"kind": "git", "url": "https://git.example.com/team/app.git"}


def bundle(name="agents", tenant=TENANT, **fields):
    fields.setdefault("env", [{"name": "OPENAI_API_KEY", "secret": "openai", "key": "api-key"}])
    return ResourceBundle.objects.create(tenant_id=tenant, name=name, **fields)


def bundle_of(run):
    return Run.objects.get(pk=run["id"]).resource_bundle


def create(api, **body):
    return api.post("runs", {"tenantId": TENANT, "projectId": PROJECT, "backendProfile": "echo", **body})


# --- picking a bundle -------------------------------------------------------------------------


def test_a_run_names_its_bundle_or_gets_the_tenants_default(client_api):
    bundle("agents")
    bundle("default", is_default=True)
    status, named = create(client_api, resourceBundleRef={"kind": "bundle", "name": "agents"})
    assert status == 201 and bundle_of(named) == "agents"
    assert named["resourceBundleRef"] == {"kind": "bundle", "name": "agents"}  # stored as sent
    status, plain = create(client_api)
    assert status == 201 and bundle_of(plain) == "default" and plain["resourceBundleRef"] is None
    assert "resourceBundle" not in plain  # the run's record is SPEC's: the bundle is the worker's business
    created = RunEvent.objects.get(run_id=named["id"], payload__phase="run-created")
    assert created.payload["resourceBundleRef"] == {"kind": "bundle", "name": "agents", "valuesPrinted": False}


def test_without_a_default_a_run_has_no_bundle(client_api):
    bundle("agents")
    status, run = create(client_api)
    assert status == 201 and bundle_of(run) is None


def test_a_spec_resource_bundle_ref_keeps_its_shape_and_takes_the_default(client_api):
    bundle("default", is_default=True)
    ref = {"kind": "git", "repoUrl": "https://git.example.com/skills.git", "bundles": [], "credentialRef": None}
    status, run = create(client_api, resourceBundleRef=ref)
    assert status == 201 and run["resourceBundleRef"] == ref and bundle_of(run) == "default"


@pytest.mark.parametrize(
    "ref",
    [
        {"kind": "bundle", "name": "missing"},
        {"kind": "bundle", "name": "theirs"},  # another tenant's
        {"kind": "bundle"},
        {"kind": "bundle", "name": ""},
        {"kind": "bundle", "name": 7},
        {"kind": "bundle", "name": "agents", "image": "evil:latest"},
    ],
)
def test_an_unknown_or_malformed_bundle_ref_is_400_and_writes_nothing(client_api, ref):
    bundle("agents")
    bundle("theirs", tenant="other-tenant")
    status, body = create(client_api, resourceBundleRef=ref)
    assert_error(status, body, 400, "schema-invalid")
    assert body["error"]["details"]["field"].startswith("resourceBundleRef.")
    assert Run.objects.count() == 0 and RunEvent.objects.count() == 0


def test_a_replay_is_the_same_run_whatever_the_default_became(client_api):
    first = bundle("first", is_default=True)
    status, run = create(client_api, idempotencyKey="k1")
    assert status == 201 and bundle_of(run) == "first"
    first.is_default = False
    first.save()
    bundle("second", is_default=True)
    status, again = create(client_api, idempotencyKey="k1")
    assert status == 200 and again["id"] == run["id"] and bundle_of(again) == "first"


def test_one_default_per_tenant():
    bundle("a", is_default=True)
    bundle("b", tenant="other-tenant", is_default=True)  # another tenant's default
    with pytest.raises(Exception, match="resource_bundle_default"):
        bundle("c", is_default=True)


# --- git workspace refs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        GIT,
        {**GIT, "ref": "release/2.x", "path": "services/api", "depth": 0, "commit": True, "push": True},
        {**GIT, "url": "git@github.com:team/app.git", "ref": "0123abcd"},
        {**GIT, "url": "ssh://git@git.example.com/team/app.git", "depth": 1000},
        {**GIT, "url": "file:///srv/git/app.git"},
        {"kind": "volume", "name": "anything"},  # not git: copied verbatim, as SPEC says
        "verbatim",
    ],
)
def test_workspace_refs_that_are_taken(client_api, ref):
    status, run = create(client_api, workspaceRef=ref)
    assert status == 201, run
    assert run["workspaceRef"] == ref and Run.objects.get(pk=run["id"]).workspace_ref == ref


@pytest.mark.parametrize(
    ("ref", "field"),
    [
        ({"kind": "git"}, "url"),
        ({**GIT, "url": "https://user:hunter2@git.example.com/a.git"}, "url"),
        ({**GIT, "url": "https://ghp_0123456789abcdefghijklmnopqrstuvwxyz@git.example.com/a.git"}, "url"),
        ({**GIT, "url": "ftp://git.example.com/a.git"}, "url"),
        ({**GIT, "url": "https://git.example.com/a b.git"}, "url"),
        ({**GIT, "url": "file://host/srv/a.git"}, "url"),
        ({**GIT, "url": "https://git.example.com:99999/a.git"}, "url"),
        ({**GIT, "url": "https://git.example.com/\u0000.git"}, "url"),
        ({**GIT, "url": "x" * 3000}, "url"),
        ({**GIT, "ref": "a..b"}, "ref"),
        ({**GIT, "ref": "-upload-pack=evil"}, "ref"),
        ({**GIT, "ref": "main.lock"}, "ref"),
        ({**GIT, "ref": "main@{1}"}, "ref"),
        ({**GIT, "ref": ""}, "ref"),
        ({**GIT, "path": "../etc"}, "path"),
        ({**GIT, "path": "/etc"}, "path"),
        ({**GIT, "path": "a/../../b"}, "path"),
        ({**GIT, "depth": -1}, "depth"),
        ({**GIT, "depth": 1001}, "depth"),
        ({**GIT, "depth": True}, "depth"),
        ({**GIT, "depth": "1"}, "depth"),
        ({**GIT, "credentialsRef": "not a name"}, "credentialsRef"),
        ({**GIT, "commit": "yes"}, "commit"),
        ({**GIT, "push": True}, "push"),  # push needs commit
        ({**GIT, "branch": "main"}, "branch"),
    ],
)
def test_bad_git_workspace_refs_are_400_naming_the_key(client_api, ref, field):
    status, body = create(client_api, workspaceRef=ref)
    assert_error(status, body, 400, "schema-invalid")
    assert body["error"]["details"]["field"] == f"workspaceRef.{field}"
    assert "hunter2" not in body["error"]["message"] and "ghp_" not in body["error"]["message"]
    assert Run.objects.count() == 0


def test_credentials_must_come_from_the_runs_bundle(client_api):
    bundle("git", env=[{"name": "GIT_TOKEN", "secret": "git", "key": "token"}], is_default=True)
    bundle("whole", env=[], env_from=["tokens"])
    status, body = create(client_api, workspaceRef={**GIT, "credentialsRef": "OTHER_TOKEN"})
    assert_error(status, body, 400, "schema-invalid")
    assert body["error"]["details"]["field"] == "workspaceRef.credentialsRef"
    status, run = create(client_api, workspaceRef={**GIT, "credentialsRef": "GIT_TOKEN"})
    assert status == 201 and bundle_of(run) == "git"
    # A bundle that takes secrets whole may provide any name.
    status, run = create(
        client_api,
        workspaceRef={**GIT, "credentialsRef": "ANY_TOKEN"},
        resourceBundleRef={"kind": "bundle", "name": "whole"},
    )
    assert status == 201


def test_a_queue_task_is_checked_as_its_run_will_be(client_api):
    bundle("agents")
    body = {"tenantId": TENANT, "projectId": PROJECT, "queue": "default", "backendProfile": "echo"}
    status, error = client_api.post("queue-tasks", {**body, "resourceBundleRef": {"kind": "bundle", "name": "nope"}})
    assert_error(status, error, 400, "schema-invalid")
    status, error = client_api.post("queue-tasks", {**body, "workspaceRef": {**GIT, "path": "../x"}})
    assert_error(status, error, 400, "schema-invalid")
    assert QueueTask.objects.count() == 0
    status, task = client_api.post(
        "queue-tasks", {**body, "workspaceRef": GIT, "resourceBundleRef": {"kind": "bundle", "name": "agents"}}
    )
    assert status == 201, task


# --- the launcher's view -----------------------------------------------------------------------


def test_the_launcher_gets_the_bundle_the_timeout_and_the_sessions_storage():
    bundle(
        "agents",
        env=[
            {"name": "OPENAI_API_KEY", "secret": "openai", "key": "api-key"},
            {"name": "GIT_TOKEN", "secret": "git", "key": "token"},
        ],
        env_from=["extra"],
        image="registry.example.com/runner:2",
        cpu="2",
        memory="4Gi",
        runtime_class_name="gvisor",
        node_selector={"pool": "agents"},
        egress_allowlist=["203.0.113.0/24:443"],
    )
    run = services.run_create(
        tenant_id=TENANT,
        project_id=PROJECT,
        backend_profile="echo",
        session_ref={"sessionId": "bundled-1"},
        resource_bundle_ref={"kind": "bundle", "name": "agents"},
        workspace_ref=GIT,
        execution_policy={"timeoutSeconds": 600},
    )[0]
    launcher = RecordingLauncher(alive=True)
    assert launching.launch_pending(launcher) == 1
    (spec,) = launcher.specs
    assert spec.bundle == Bundle(
        name="agents",
        env=(SecretEnv("OPENAI_API_KEY", "openai", "api-key"), SecretEnv("GIT_TOKEN", "git", "token")),
        env_from=("extra",),
        image="registry.example.com/runner:2",
        cpu="2",
        memory="4Gi",
        runtime_class_name="gvisor",
        node_selector=(("pool", "agents"),),
        egress_allowlist=("203.0.113.0/24:443",),
    )
    assert spec.timeout_seconds == 600.0
    assert spec.needs_storage  # the session's tree persists on its volume
    assert spec.session_id == "bundled-1" and run.resource_bundle == "agents"
    plain = make_run()
    assert launching.launch_pending(launcher) == 1
    assert launcher.specs[1].run_id == plain.id
    assert (launcher.specs[1].bundle, launcher.specs[1].timeout_seconds) == (None, None)


def test_a_run_whose_bundle_was_deleted_fails_at_launch_saying_so():
    bundle("agents", is_default=True)
    run = make_run()
    ResourceBundle.objects.all().delete()
    launcher = RecordingLauncher(alive=True)
    assert launching.launch_pending(launcher) == 0 and launcher.specs == []
    stored = Run.objects.get(pk=run.id)
    assert (stored.status, stored.failure_kind) == ("failed", "infra-failed")
    assert stored.failure_message == "resource bundle 'agents' no longer exists"


# --- the local secret store ----------------------------------------------------------------------


def test_the_local_launcher_reads_the_bundles_secrets_from_files_or_the_environment(tmp_path, monkeypatch):
    (tmp_path / "openai").mkdir()
    (tmp_path / "openai" / "api-key").write_text("sk-local-openai-key\n")
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "GIT_TOKEN").write_text("git-token-value")
    (tmp_path / "tokens" / "not a name").write_text("skipped")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "from-the-environment")
    local = Bundle(
        name="local",
        env=(SecretEnv("OPENAI_API_KEY", "openai", "api-key"), SecretEnv("ANTHROPIC_API_KEY", "anthropic", "key")),
        env_from=("tokens",),
    )
    assert bundle_environment(local, tmp_path) == {
        "GIT_TOKEN": "git-token-value",
        "OPENAI_API_KEY": "sk-local-openai-key",  # one trailing newline dropped
        "ANTHROPIC_API_KEY": "from-the-environment",
    }
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(LookupError, match="ANTHROPIC_API_KEY needs") as missing:
        bundle_environment(local, tmp_path)
    assert "sk-local" not in str(missing.value)
    with pytest.raises(LookupError, match="secret 'absent'"):
        bundle_environment(Bundle(name="x", env_from=("absent",)), tmp_path)


class LocalFailing(Launcher):
    """Stands for a launch whose bundle's secret is missing."""

    name = "test"

    def launch(self, spec):
        raise LookupError("resource bundle 'local': OPENAI_API_KEY needs var/secrets/openai/api-key")


def test_a_run_that_cannot_launch_says_why_in_its_failure():
    run = make_run()
    for _ in range(launching.MAX_LAUNCHES):
        launching.launch_pending(LocalFailing())
    launching.launch_pending(LocalFailing())
    stored = Run.objects.get(pk=run.id)
    assert stored.status == "failed"
    assert stored.failure_message == (
        "no runner started after 3 launches: resource bundle 'local': OPENAI_API_KEY needs var/secrets/openai/api-key"
    )


# --- admin -------------------------------------------------------------------------------------


def form(**fields):
    base = {
        "tenant_id": TENANT,
        "name": "agents",
        "env": '[{"name": "OPENAI_API_KEY", "secret": "openai", "key": "api-key"}]',
        "env_from": "[]",
        "node_selector": "{}",
        "egress_allowlist": "[]",
        "image": "",
        "cpu": "",
        "memory": "",
        "runtime_class_name": "",
    }
    return {**base, **fields}


def test_operators_manage_bundles_in_admin_and_values_are_refused(staff):
    response = staff.post("/admin/runs/resourcebundle/add/", form(is_default="on"))
    assert response.status_code == 302, response.content.decode()[:2000]
    stored = ResourceBundle.objects.get(name="agents")
    assert stored.is_default and stored.env == [{"name": "OPENAI_API_KEY", "secret": "openai", "key": "api-key"}]
    page = staff.get("/admin/runs/resourcebundle/").content.decode()
    assert "OPENAI_API_KEY" in page
    for bad in (
        form(name="b", env='[{"name": "OPENAI_API_KEY", "value": "sk-pasted-secret-value-000000"}]'),
        form(name="c", cpu="two"),
        form(name="d", egress_allowlist='["example.com"]'),
        form(name="e", node_selector='{"pool": "a b"}'),
        form(name="f", runtime_class_name="G Visor"),
    ):
        response = staff.post("/admin/runs/resourcebundle/add/", bad)
        assert response.status_code == 200 and "errorlist" in response.content.decode(), bad
    assert list(ResourceBundle.objects.values_list("name", flat=True)) == ["agents"]


def test_the_run_admin_shows_the_runs_bundle(staff):
    bundle("agents", is_default=True)
    run = make_run()
    response = staff.get(f"/admin/runs/run/{quote(run.id)}/change/")
    assert response.status_code == 200, (response.status_code, response.get("Location"))
    page = response.content.decode()
    assert "agents" in page
    assert "api-key" not in page  # the bundle's references are on its own page, not the run's


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
GIT_LIKE = st.fixed_dictionaries(
    {"kind": st.just("git")},
    optional={
        "url": st.one_of(st.text(), st.sampled_from(["https://h/x", "file:///x", "git@h:x", "https://[::1", "ssh://"])),
        "ref": JSON,
        "path": JSON,
        "depth": JSON,
        "credentialsRef": JSON,
        "commit": JSON,
        "push": JSON,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ref=st.one_of(GIT_LIKE, JSON))
def test_any_workspace_ref_is_taken_or_refused_with_a_400(ref):
    try:
        assert validate_workspace_ref(ref) is ref
    except AgentRunError as error:
        assert error.status == 400 and error.kind == "schema-invalid"
        assert error.details["field"].startswith("workspaceRef.")


@settings(max_examples=200, deadline=None)
@given(ref=st.one_of(st.fixed_dictionaries({"kind": st.just("bundle")}, optional={"name": JSON, "x": JSON}), JSON))
def test_any_resource_bundle_ref_is_taken_or_refused_with_a_400(ref):
    try:
        validate_resource_bundle_ref(ref)
    except AgentRunError as error:
        assert error.status == 400 and error.kind == "schema-invalid"


def test_file_repositories_only_where_allowed(client_api, settings):
    settings.AGENTRUN_GIT_FILE_URLS = False
    status, body = create(client_api, workspaceRef={**GIT, "url": "file:///srv/git/other-tenant.git"})
    assert_error(status, body, 400, "schema-invalid")
    assert "AGENTRUN_GIT_FILE_URLS" in body["error"]["message"]
    status, _ = create(client_api, workspaceRef=GIT)
    assert status == 201


def test_a_task_whose_bundle_was_deleted_fails_at_dispatch_saying_so(client_api):
    bundle("agents")
    body = {"tenantId": TENANT, "projectId": PROJECT, "queue": "default", "backendProfile": "echo"}
    status, task = client_api.post("queue-tasks", {**body, "resourceBundleRef": {"kind": "bundle", "name": "agents"}})
    assert status == 201
    ResourceBundle.objects.all().delete()
    dispatched = queue_services.dispatch_one()
    assert dispatched is not None and dispatched.run_id is None
    stored = QueueTask.objects.get(pk=task["id"])
    assert stored.state == "failed" and Run.objects.count() == 0
    assert stored.latest_attempt["failureMessage"] == "unknown resource bundle 'agents'"
