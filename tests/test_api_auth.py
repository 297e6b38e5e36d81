"""HTTP tests for authentication, roles, tenant/project/run scoping and the create_api_key command."""

from __future__ import annotations

import hashlib
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from agentrun.models import ApiKey
from runs import services
from runs.models import Command, Run, RunEvent, Runner, RunnerJob
from tests.helpers import PROJECT, TENANT, KeyClient, assert_error, claim, make_key, make_run

pytestmark = pytest.mark.django_db


def job_body():
    return {
        "commandId": "cmd_1",
        "payloadHash": "h",
        "attemptId": "a",
        "runnerId": "runner-1",
        "namespace": "ns",
        "jobName": "j",
        "managerUrl": "http://m",
        "image": "i",
        "sourceCommit": "c",
    }


def world():
    """A claimed run (runner-1, epoch 1) with one pending turn."""
    run = claim(make_run())
    command, _ = services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "p"})
    return run, command


def db_state():
    return (
        list(Run.objects.order_by("id").values_list("id", "status", "lease_epoch", "lease_expires_at")),
        list(Command.objects.order_by("id").values_list("id", "state")),
        RunEvent.objects.count(),
        Runner.objects.count(),
        RunnerJob.objects.count(),
    )


LEASE = {"runnerId": "runner-1", "leaseEpoch": 1}

# name -> (method, path, body, roles allowed besides operator, success status)
CALLS = {
    "run-create": ("post", "runs", {"backendProfile": "echo"}, {"client"}, 201),
    "run-get": ("get", "runs/{run}", None, {"client", "runner"}, 200),
    "run-cancel": ("post", "runs/{run}/cancel", {}, {"client"}, 200),
    "run-claim": ("post", "runs/{run}/claim", {"runnerId": "runner-1"}, {"runner"}, 200),
    "run-heartbeat": ("post", "runs/{run}/heartbeat", LEASE, {"runner"}, 200),
    "run-finish": ("post", "runs/{run}/finish", {**LEASE, "terminalStatus": "completed"}, {"runner"}, 200),
    "events-read": ("get", "runs/{run}/events", None, {"client", "runner"}, 200),
    "events-append": ("post", "runs/{run}/events", {**LEASE, "type": "usage", "payload": {}}, {"runner"}, 201),
    "commands-create": ("post", "runs/{run}/commands", {"type": "turn", "payload": {}}, {"client"}, 201),
    "commands-list": ("get", "runs/{run}/commands", None, {"client", "runner"}, 200),
    "command-get": ("get", "commands/{command}", None, {"client", "runner"}, 200),
    "command-ack": ("post", "commands/{command}/ack", LEASE, {"runner"}, 200),
    "command-finish": ("post", "commands/{command}/finish", {**LEASE, "terminalStatus": "completed"}, {"runner"}, 200),
    "command-cancel": ("post", "commands/{command}/cancel", {}, {"client"}, 200),
    "runners": ("post", "runners", {"runnerId": "pod-1"}, {"runner"}, 201),
    "runner-jobs-list": ("get", "runs/{run}/runner-jobs", None, {"runner"}, 200),
    "runner-jobs-create": ("post", "runs/{run}/runner-jobs", job_body(), {"runner"}, 201),
    "backends": ("get", "backends", None, {"client", "runner"}, 200),
}


def call(api, name, run, command):
    method, path, body, _, _ = CALLS[name]
    path = path.format(run=run.id, command=command.id)
    return api.get(path) if method == "get" else api.post(path, body)


ALLOWED = [(role, name) for name, spec in CALLS.items() for role in sorted(spec[3] | {"operator"})]
FORBIDDEN = [(role, name) for name, spec in CALLS.items() for role in ("client", "runner") if role not in spec[3]]


@pytest.mark.parametrize(("role", "name"), ALLOWED)
def test_role_may_call(role, name):
    run, command = world()
    status, body = call(make_key(role), name, run, command)
    assert status == CALLS[name][4], body


@pytest.mark.parametrize(("role", "name"), FORBIDDEN)
def test_role_may_not_call(role, name):
    run, command = world()
    before = db_state()
    assert_error(*call(make_key(role), name, run, command), 403, "forbidden")
    assert db_state() == before


def test_forbidden_list_matches_roles_table():
    """API.md's Roles table, spelled out, so a change to CALLS cannot silently drop a 403 case."""
    assert {name for role, name in FORBIDDEN if role == "client"} == {
        "run-claim",
        "run-heartbeat",
        "run-finish",
        "events-append",
        "command-ack",
        "command-finish",
        "runners",
        "runner-jobs-list",
        "runner-jobs-create",
    }
    assert {name for role, name in FORBIDDEN if role == "runner"} == {
        "run-create",
        "run-cancel",
        "commands-create",
        "command-cancel",
    }


# --- authentication ----------------------------------------------------------------------------


def test_no_key_is_401_on_every_route(anonymous_api):
    run, command = world()
    before = db_state()
    for name in sorted(CALLS):
        assert_error(*call(anonymous_api, name, run, command), 401, "auth-required")
    assert db_state() == before


@pytest.mark.parametrize(
    "header",
    ["Bearer ar_not-a-real-key", "Token abc", "Bearer", "Bearer a b", "Basic dXNlcjpwYXNz", "ar_rawkeywithoutscheme"],
)
def test_bad_or_malformed_key_is_401(header):
    run = make_run()
    api = KeyClient(None)
    api.client.credentials(HTTP_AUTHORIZATION=header)
    response = api.client.get(f"/api/v1/runs/{run.id}")
    assert_error(response.status_code, response.json(), 401, "auth-required")
    assert response["WWW-Authenticate"].lower().startswith("bearer")


def test_bearer_scheme_is_case_insensitive(client_api):
    raw = client_api.client._credentials["HTTP_AUTHORIZATION"].split()[1]
    api = KeyClient(None)
    api.client.credentials(HTTP_AUTHORIZATION=f"bearer {raw}")
    assert api.get("backends")[0] == 200


def test_revoked_key_is_401(client_api):
    run = make_run()
    assert client_api.get(f"runs/{run.id}")[0] == 200
    ApiKey.objects.filter(pk=client_api.key.pk).update(revoked_at=timezone.now())
    assert_error(*client_api.get(f"runs/{run.id}"), 401, "auth-required")
    assert_error(*client_api.get("backends"), 401, "auth-required")


def test_health_livez_readyz_need_no_key_even_with_bad_key():
    api = KeyClient("ar_bogus")
    assert api.get("health")[0] == 200
    assert api.get("/livez")[0] == 200
    assert api.get("/readyz")[0] == 200


# --- tenant, project and run scoping -------------------------------------------------------------


def test_other_tenants_run_is_404_for_every_role():
    run, command = world()
    for role in ("client", "runner", "operator"):
        api = make_key(role, tenant="globex")
        assert_error(*api.get(f"runs/{run.id}"), 404, "schema-invalid")
        assert_error(*api.get(f"runs/{run.id}/events"), 404, "schema-invalid")
        assert_error(*api.get(f"runs/{run.id}/commands"), 404, "schema-invalid")
        assert_error(*api.get(f"commands/{command.id}"), 404, "schema-invalid")
    before = db_state()
    op = make_key("operator", tenant="globex")
    for name in (
        "run-cancel",
        "run-claim",
        "run-heartbeat",
        "run-finish",
        "events-append",
        "commands-create",
        "command-ack",
        "command-finish",
        "command-cancel",
        "runner-jobs-list",
        "runner-jobs-create",
    ):
        assert_error(*call(op, name, run, command), 404, "schema-invalid")
    assert db_state() == before


def test_project_bound_key_cannot_see_other_project():
    run = make_run(project="mobile")
    command, _ = services.command_create(run_id=run.id, command_type="turn", payload={})
    api = make_key("client", project="web")
    assert_error(*api.get(f"runs/{run.id}"), 404, "schema-invalid")
    assert_error(*api.get(f"commands/{command.id}"), 404, "schema-invalid")
    assert_error(*api.post(f"runs/{run.id}/cancel"), 404, "schema-invalid")
    assert Run.objects.get(pk=run.id).status == "pending"
    assert make_key("client", project="mobile").get(f"runs/{run.id}")[0] == 200


def test_tenant_wide_key_sees_every_project_of_its_tenant():
    run = make_run(project="mobile")
    api = make_key("client", project=None)
    assert api.get(f"runs/{run.id}")[0] == 200


def test_run_scoped_runner_key_sees_only_its_run():
    mine, my_command = world()
    other, other_command = world()
    api = make_key("runner", run=mine.id)
    assert api.get(f"runs/{mine.id}")[0] == 200
    assert api.get(f"commands/{my_command.id}")[0] == 200
    assert api.post(f"runs/{mine.id}/heartbeat", LEASE)[0] == 200
    before = db_state()
    for name in (
        "run-get",
        "run-claim",
        "run-heartbeat",
        "run-finish",
        "events-read",
        "events-append",
        "commands-list",
        "command-get",
        "command-ack",
        "command-finish",
        "runner-jobs-list",
        "runner-jobs-create",
    ):
        assert_error(*call(api, name, other, other_command), 404, "schema-invalid")
    assert db_state() == before


def test_run_create_fills_tenant_and_project_from_key(client_api):
    status, body = client_api.post("runs", {"backendProfile": "echo"})
    assert status == 201 and (body["tenantId"], body["projectId"]) == (TENANT, PROJECT)
    status, body = client_api.post("runs", {"backendProfile": "echo", "tenantId": TENANT, "projectId": PROJECT})
    assert status == 201 and (body["tenantId"], body["projectId"]) == (TENANT, PROJECT)


@pytest.mark.parametrize(
    "scope", [{"tenantId": "globex"}, {"projectId": "mobile"}, {"tenantId": "globex", "projectId": PROJECT}]
)
def test_run_create_outside_key_scope_is_403(client_api, scope):
    assert_error(*client_api.post("runs", {"backendProfile": "echo", **scope}), 403, "tenant-policy-denied")
    assert Run.objects.count() == 0


def test_tenant_wide_key_must_name_project():
    api = make_key("client", project=None)
    assert_error(*api.post("runs", {"backendProfile": "echo"}), 400, "schema-invalid")
    status, body = api.post("runs", {"backendProfile": "echo", "projectId": "any"})
    assert status == 201 and body["projectId"] == "any" and body["tenantId"] == TENANT


@pytest.mark.parametrize(("tenant", "project"), [("globex", PROJECT), (TENANT, "mobile")])
def test_session_of_other_tenant_or_project_is_403(client_api, tenant, project):
    make_run(tenant=tenant, project=project, session_id="shared-sess")
    runs = Run.objects.count()
    status, body = client_api.post("runs", {"backendProfile": "echo", "sessionRef": {"sessionId": "shared-sess"}})
    assert_error(status, body, 403, "tenant-policy-denied")
    assert body["error"]["details"] == {"sessionId": "shared-sess", "valuesPrinted": False}
    assert Run.objects.count() == runs


def test_session_of_other_backend_is_400_with_details(client_api):
    make_run(backend="codex", session_id="codex-sess")
    runs = Run.objects.count()
    status, body = client_api.post("runs", {"backendProfile": "echo", "sessionRef": {"sessionId": "codex-sess"}})
    assert_error(status, body, 400, "schema-invalid")
    assert body["error"]["details"] == {
        "sessionId": "codex-sess",
        "existingBackendProfile": "codex",
        "requestedBackendProfile": "echo",
        "valuesPrinted": False,
    }
    assert Run.objects.count() == runs


def test_session_tenant_check_comes_before_backend_check(client_api):
    make_run(tenant="globex", backend="codex", session_id="both-sess")
    assert_error(
        *client_api.post("runs", {"backendProfile": "echo", "sessionRef": {"sessionId": "both-sess"}}),
        403,
        "tenant-policy-denied",
    )


def test_operator_does_everything_in_its_tenant(operator_api):
    status, run = operator_api.post("runs", {"backendProfile": "echo"})
    assert status == 201
    assert operator_api.post(f"runs/{run['id']}/claim", {"runnerId": "op-runner"})[1]["leaseEpoch"] == 1
    status, command = operator_api.post(f"runs/{run['id']}/commands", {"type": "turn", "payload": {}})
    assert status == 201
    lease = {"runnerId": "op-runner", "leaseEpoch": 1}
    assert operator_api.post(f"commands/{command['id']}/ack", lease)[1]["state"] == "acknowledged"
    assert operator_api.post(f"runs/{run['id']}/events", {**lease, "type": "usage", "payload": {}})[0] == 201
    assert (
        operator_api.post(f"commands/{command['id']}/finish", {**lease, "terminalStatus": "completed"})[1]["state"]
        == "completed"
    )
    assert operator_api.post(f"runs/{run['id']}/heartbeat", lease)[0] == 200
    assert operator_api.post(f"runs/{run['id']}/runner-jobs", job_body())[0] == 201
    assert operator_api.get(f"runs/{run['id']}/runner-jobs")[1]["count"] == 1
    assert operator_api.post("runners", {"runnerId": "op-runner"})[0] == 201
    assert operator_api.post(f"runs/{run['id']}/cancel")[1]["status"] == "cancelled"


# --- create_api_key ---------------------------------------------------------------------------


def test_create_api_key_prints_only_the_key_and_stores_its_hash():
    out = StringIO()
    call_command("create_api_key", "--tenant", "t1", "--project", "p1", "--role", "client", stdout=out)
    printed = out.getvalue()
    raw = printed.strip()
    assert printed.strip().count("\n") == 0 and " " not in raw and raw
    key = ApiKey.objects.get(tenant_id="t1")
    assert key.role == "client" and key.project_id == "p1" and key.run_id is None
    assert key.key_hash == hashlib.sha256(raw.encode()).hexdigest()
    stored = [str(value) for value in ApiKey.objects.filter(pk=key.pk).values().first().values()]
    assert raw not in stored
    assert all(raw not in value for value in stored)
    status, body = KeyClient(raw).get("backends")
    assert status == 200 and body["count"] == 3


def test_create_api_key_run_scoped_runner():
    run = make_run()
    out = StringIO()
    call_command("create_api_key", "--tenant", TENANT, "--role", "runner", "--run", run.id, stdout=out)
    api = KeyClient(out.getvalue().strip())
    assert api.get(f"runs/{run.id}")[0] == 200
    assert_error(*api.get(f"runs/{make_run().id}"), 404, "schema-invalid")


def test_create_api_key_refuses_run_scope_for_client():
    with pytest.raises(CommandError):
        call_command("create_api_key", "--tenant", TENANT, "--role", "client", "--run", "run_x", stdout=StringIO())
    assert not ApiKey.objects.exists()


def test_key_cache_skips_the_lookup_and_honours_its_time(settings, django_assert_num_queries):
    from agentrun.auth import key_cache

    settings.AGENTRUN_AUTH_CACHE_SECONDS = 60
    key_cache.clear()
    api = make_key("client")
    assert api.get("backends")[0] == 200
    with django_assert_num_queries(0):
        assert api.get("backends")[0] == 200
    # A revoked key is refused once its entry is gone (here: the cache cleared; in service: the TTL).
    type(api.key).objects.filter(pk=api.key.pk).update(revoked_at="2026-01-01T00:00:00Z")
    assert api.get("backends")[0] == 200
    key_cache.clear()
    status, body = api.get("backends")
    assert status == 401 and body["error"]["kind"] == "auth-required"
    key_cache.clear()
