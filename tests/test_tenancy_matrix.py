"""Tenancy, generated from the URL conf: every route under /api/v1/ and each of its methods, called
with keys of another tenant, another project and another run (API.md, Roles).

ROUTES maps each (route, method) of the URL conf to its case, and `test_every_route_has_a_case` fails
on a route without one. A case gives the route's roles (API.md's table), what the owner of the target
gets, and how a key outside the target's scope is answered: 404 in the envelope for an object (the
same answer as for an id that does not exist), 403 `tenant-policy-denied` for reusing another tenant's
session or runner id, and lists, feeds, stats and the commander that hold the key's own rows only.
A refused call leaves every table as it was.

The data (four worlds: acme/web twice, acme/other-project and other/x) is built once for the module,
in a transaction rolled back at its end; each test runs in a savepoint inside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import StringIO

import pytest
from django.apps import apps
from django.core.management import call_command
from django.db import connection, transaction
from django.urls import URLPattern, URLResolver, get_resolver

from agentrun.auth import Scope
from queues import services as queue_services
from runs import services as run_services
from sessions import services as session_services
from tests.helpers import KeyClient, assert_error, make_key, make_run

pytestmark = pytest.mark.django_db

API_PREFIX = "api/v1/"
# The only routes under /api/v1/ that need no key (test_skipped_routes_need_no_key checks it).
SKIPPED = {"health", "schema/", "docs/"}
CLIENT, RUNNER, OPERATOR = "client", "runner", "operator"
UNRESTRICTED = Scope.unrestricted()
# Models whose rows a refused call must leave as they were (the version counters included).
DATA_APPS = ("agentrun", "runs", "agent_sessions", "queues")


# --- the worlds ----------------------------------------------------------------------------------


@dataclass
class World:
    """One tenant/project's objects: a run claimed by its registered runner, with a pending turn,
    events, a runner job and a session with a PVC; an idle session; a run with an idempotency key and
    no session; two queue tasks (one pending, one cancelled and read)."""

    name: str
    tenant: str
    project: str
    run: str = ""
    command: str = ""
    session: str = ""
    task: str = ""
    runner: str = ""
    pvc: str = ""
    job: str = ""
    idempotent_run: str = ""
    sessions: set[str] = field(default_factory=set)
    tasks: set[str] = field(default_factory=set)

    @property
    def lease(self) -> dict:
        return {"runnerId": self.runner, "leaseEpoch": 1}

    def job_body(self, **extra) -> dict:
        return {
            "commandId": self.command,
            "payloadHash": "h",
            "attemptId": "a",
            "runnerId": self.runner,
            "namespace": "agents",
            "jobName": f"job-{self.tag}",
            "managerUrl": "http://manager",
            "image": "runner",
            "sourceCommit": "c0ffee",
            **extra,
        }

    @property
    def tag(self) -> str:
        return self.name.replace("/", "-").replace("#", "-")


WORLDS = {
    "acme/web": ("acme", "web"),
    "acme/web#2": ("acme", "web"),
    "acme/other-project": ("acme", "other-project"),
    "other/x": ("other", "x"),
}


def build_world(name: str) -> World:
    tenant, project = WORLDS[name]
    world = World(name=name, tenant=tenant, project=project)
    tag = world.tag
    world.session, world.runner, world.pvc = f"sess-{tag}", f"runner-{tag}", f"pvc-{tag}"
    run = make_run(tenant=tenant, project=project, session_id=world.session)
    world.run = run.id
    run_services.runner_register(tenant_id=tenant, runner_id=world.runner, attributes={"pod": tag})
    run_services.run_claim(run_id=run.id, runner_id=world.runner, lease_ms=600_000)
    command, _ = run_services.command_create(run_id=run.id, command_type="turn", payload={"prompt": f"hi {tag}"})
    world.command = command.id
    run_services.event_append(
        run_id=run.id,
        runner_id=world.runner,
        lease_epoch=1,
        batch_key=f"batch-{tag}",
        events=[("assistant_message", {"text": f"output of {tag}"}), ("usage", {"inputTokens": 3})],
    )
    job, _ = run_services.runner_job_save(
        run_id=run.id,
        job_id=f"rjob-{tag}",
        fields={
            "command_id": command.id,
            "payload_hash": "h",
            "attempt_id": "a",
            "runner_id": world.runner,
            "namespace": "agents",
            "job_name": f"job-{tag}",
            "manager_url": "http://manager",
            "image": "runner",
            "source_commit": "c0ffee",
            "service_account_name": None,
            "result": {},
        },
    )
    world.job = job.id
    session_services.session_storage_refresh(session_id=world.session, storage_kind="pvc", pvc_name=world.pvc)
    session_services.session_mark_read(session_id=world.session, reader_id="reader-1", scope=UNRESTRICTED)
    idle, _ = session_services.session_upsert(
        session_id=f"sess-{tag}-idle",
        tenant_id=tenant,
        project_id=project,
        backend_profile="echo",
        conversation_id=None,
        thread_id=None,
        metadata={"owner": tag},
        expires_at=None,
        codex_rollout_subdir=None,
    )
    world.sessions = {world.session, idle.session_id}
    world.idempotent_run = make_run(tenant=tenant, project=project, idempotency_key=f"idem-{tag}").id
    tasks = [
        queue_services.task_create(
            tenant_id=tenant,
            project_id=project,
            queue="default",
            lane="default",
            title=f"{title} {tag}",
            priority=priority,
            backend_profile="echo",
            idempotency_key=f"idem-{tag}-{title}",
        )[0]
        for title, priority in (("first", 5), ("second", 0))
    ]
    queue_services.task_cancel(task_id=tasks[1].id, reason="done with it")
    queue_services.task_mark_read(task_id=tasks[1].id, reader_id="reader-1", scope=UNRESTRICTED)
    world.task, world.tasks = tasks[0].id, {task.id for task in tasks}
    return world


def run_scoped_key(run_id: str, tenant: str, project: str) -> KeyClient:
    """A runner key made the operator's way: create_api_key --run."""
    out = StringIO()
    call_command(
        "create_api_key", "--tenant", tenant, "--project", project, "--role", RUNNER, "--run", run_id, stdout=out
    )
    return KeyClient(out.getvalue().strip())


@dataclass
class Fixture:
    worlds: dict[str, World]
    keys: dict[tuple[str, str], KeyClient]


# Key scopes: a tenant and project, a whole tenant (`*`), or one run (`run:` and the world's name).
KEY_SCOPES = {
    "acme/web": ("acme", "web"),
    "acme/other-project": ("acme", "other-project"),
    "other/x": ("other", "x"),
    "acme/*": ("acme", None),
    "other/*": ("other", None),
}
# What each key scope may see: the worlds whose rows are its own.
VISIBLE = {
    "acme/web": ("acme/web", "acme/web#2"),
    "acme/other-project": ("acme/other-project",),
    "other/x": ("other/x",),
    "acme/*": ("acme/web", "acme/web#2", "acme/other-project"),
    "other/*": ("other/x",),
    "run:acme/web": ("acme/web",),
    "run:acme/web#2": ("acme/web#2",),
}


@pytest.fixture(scope="module")
def fx(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        # Services are durable transactions; marked like a TestCase's, this block lets them nest
        # (as savepoints). It is rolled back at the end of the module: nothing outlives it.
        outer = savepoint()
        outer.__enter__()
        try:
            worlds = {name: build_world(name) for name in WORLDS}
            keys = {
                (scope, role): make_key(role, tenant=tenant, project=project)
                for scope, (tenant, project) in KEY_SCOPES.items()
                for role in (CLIENT, RUNNER, OPERATOR)
            }
            for name in ("acme/web", "acme/web#2"):
                world = worlds[name]
                keys[(f"run:{name}", RUNNER)] = run_scoped_key(world.run, world.tenant, world.project)
            yield Fixture(worlds, keys)
        finally:
            transaction.set_rollback(True)
            outer.__exit__(None, None, None)


def savepoint():
    """An atomic block that services' durable transactions may nest in (as TestCase's blocks are)."""
    block = transaction.atomic()
    block._from_testcase = True
    return block


@contextmanager
def rolled_back():
    """A write undone at the end of the block, so that each role starts from the same tables."""
    with savepoint():
        yield
        transaction.set_rollback(True)


def tables() -> dict[str, list[str]]:
    """Every row of every data model as text, in one query, to compare before and after a call."""
    models = [
        model
        for label in DATA_APPS
        for model in apps.get_app_config(label).get_models()
        if model._meta.label != "agentrun.ApiKey"
    ]
    columns = ", ".join(
        f"ARRAY(SELECT t::text FROM {connection.ops.quote_name(model._meta.db_table)} t ORDER BY 1)"  # noqa: S608 - quoted table names from the models
        for model in models
    )
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {columns}")
        rows = cursor.fetchone()
    return {model._meta.label: list(table) for model, table in zip(models, rows, strict=True)}


def row_of(object_id: str, row: str) -> bool:
    """Whether a row (as text) is the one whose first column, its id, is `object_id`."""
    return row.startswith(f"({object_id},")


# --- the cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    path: str  # {run}, {command}, {session}, {task} are filled from the target world
    roles: frozenset  # API.md's roles for the route, besides the operator (empty: the operator's only)
    ok: int  # the owner's status
    body: Callable[[World], dict] | None = None
    stranger: Callable | None = None  # how a key outside the target's scope is answered (None: 404)

    @property
    def target(self) -> str | None:
        for name in ("run", "command", "session", "task"):
            if "{" + name + "}" in self.path:
                return name
        return None


def send(api: KeyClient, method: str, case: Case, world: World, *, target_id: str | None = None, **params):
    ids = {name: getattr(world, name) for name in ("run", "command", "session", "task")}
    if target_id is not None:
        ids[case.target] = target_id
    path = case.path.format(**ids)
    body = case.body(world) if case.body else {}
    if method == "GET":
        return api.get(path, **params)
    return api.put(path, body) if method == "PUT" else api.post(path, body)


def roles_for(case: Case, key_scope: str) -> list[str]:
    if key_scope.startswith("run:"):
        return [RUNNER] if RUNNER in case.roles else []
    return sorted(case.roles | {OPERATOR})


def key_of(fx: Fixture, key_scope: str, role: str) -> KeyClient:
    return fx.keys[(key_scope, role)]


# Strangers: a key scope aimed at a world outside it.
STRANGERS = {
    "other-tenant": ("other/x", "acme/web"),
    "other-tenant-wide": ("other/*", "acme/web"),
    "other-project": ("acme/other-project", "acme/web"),
    "first-tenant-on-other": ("acme/web", "other/x"),
    "first-tenant-wide-on-other": ("acme/*", "other/x"),
    "other-run": ("run:acme/web#2", "acme/web"),
}


def expect_404(fx: Fixture, method: str, case: Case, key_scope: str, world: World) -> None:
    """An object outside the key's scope is 404, told apart by nothing from one that does not exist."""
    answers = []
    for role in roles_for(case, key_scope):
        status, body = send(key_of(fx, key_scope, role), method, case, world)
        assert_error(status, body, 404, "schema-invalid")
        answers.append((status, body))
    foreign_id = getattr(world, case.target)
    missing_id = f"missing-{foreign_id}"
    api = key_of(fx, key_scope, roles_for(case, key_scope)[0])
    status, body = send(api, method, case, world, target_id=missing_id)
    assert answers[0] == (status, json.loads(json.dumps(body).replace(missing_id, foreign_id)))


def expect_policy_denied_put(fx: Fixture, method: str, case: Case, key_scope: str, world: World) -> None:
    """PUT of another tenant's (or project's) session id: 403 tenant-policy-denied (API.md, Roles)."""
    path = case.path.format(session=world.session)
    for role in roles_for(case, key_scope):
        status, body = key_of(fx, key_scope, role).put(path, {**case.body(world), **own_project(key_scope)})
        assert_error(status, body, 403, "tenant-policy-denied")
        assert body["error"]["details"] == {"sessionId": world.session, "valuesPrinted": False}


def own_project(key_scope: str) -> dict:
    """A body's project for a tenant-wide key (which has to name one)."""
    return {"projectId": "scratch"} if key_scope.endswith("/*") else {}


def tenant_of(key_scope: str) -> str:
    return key_scope.removeprefix("run:").split("/")[0]


def assert_only_added(before: dict, after: dict, labels: set[str]) -> dict[str, set[str]]:
    """No row changed or went (the version counters aside); new rows only in `labels`. Returns them."""
    added = {}
    for label, rows in after.items():
        if label == "agentrun.Counter":
            continue
        assert set(before[label]) <= set(rows), label
        added[label] = set(rows) - set(before[label])
        assert label in labels or not added[label], label
    return added


def expect_run_create_scoped(fx: Fixture, method: str, case: Case, key_scope: str, world: World) -> None:
    """Another tenant's session id is 403 tenant-policy-denied, and so is its tenantId; its
    idempotency key is not a replay of its run but a new run, in the key's own scope."""
    for role in roles_for(case, key_scope):
        with rolled_back():
            api = key_of(fx, key_scope, role)
            extra = own_project(key_scope)
            before = tables()
            reuse = {"backendProfile": "echo", "sessionRef": {"sessionId": world.session}, **extra}
            status, body = api.post("runs", reuse)
            assert_error(status, body, 403, "tenant-policy-denied")
            assert body["error"]["details"] == {"sessionId": world.session, "valuesPrinted": False}
            status, body = api.post(
                "runs", {"backendProfile": "echo", "tenantId": world.tenant, "projectId": world.project}
            )
            assert_error(status, body, 403, "tenant-policy-denied")
            assert tables() == before
            status, body = api.post("runs", {"backendProfile": "echo", "idempotencyKey": f"idem-{world.tag}", **extra})
            assert status == 201, body
            assert body["id"] != world.idempotent_run and body["tenantId"] == tenant_of(key_scope)
            added = assert_only_added(before, tables(), {"runs.Run", "runs.RunEvent"})
            assert len(added["runs.Run"]) == 1 and row_of(body["id"], next(iter(added["runs.Run"])))


def expect_task_create_scoped(fx: Fixture, method: str, case: Case, key_scope: str, world: World) -> None:
    """Another tenant's tenantId is 403; its idempotency key makes a new task in the key's scope."""
    for role in roles_for(case, key_scope):
        with rolled_back():
            api = key_of(fx, key_scope, role)
            body = {"queue": "default", "backendProfile": "echo", "title": f"first {world.tag}", "priority": 5}
            before = tables()
            status, error = api.post("queue-tasks", {**body, "tenantId": world.tenant, "projectId": world.project})
            assert_error(status, error, 403, "tenant-policy-denied")
            assert tables() == before
            status, task = api.post(
                "queue-tasks", {**body, **own_project(key_scope), "idempotencyKey": f"idem-{world.tag}-first"}
            )
            assert status == 201, task
            assert task["id"] not in world.tasks and task["tenantId"] == tenant_of(key_scope)
            added = assert_only_added(before, tables(), {"queues.QueueTask"})
            assert len(added["queues.QueueTask"]) == 1


def expect_runner_scoped(fx: Fixture, method: str, case: Case, key_scope: str, world: World) -> None:
    """Runners belong to a tenant: another tenant's runner id is 403 tenant-policy-denied and
    changes nothing. Within the tenant (another project, another run's key) the runner is the
    tenant's own, and re-registering it replaces its attributes, and nothing else."""
    same_tenant = tenant_of(key_scope) == world.tenant

    def others(label: str, rows: list[str]) -> list[str]:
        return [row for row in rows if label != "runs.Runner" or not row_of(world.runner, row)]

    for role in roles_for(case, key_scope):
        with rolled_back():
            before = tables()
            status, body = key_of(fx, key_scope, role).post("runners", {"runnerId": world.runner, "pod": "intruder"})
            after = tables()
        if not same_tenant:
            assert_error(status, body, 403, "tenant-policy-denied")
            assert body["error"]["details"] == {"runnerId": world.runner, "valuesPrinted": False}
            assert after == before
        else:
            assert status == 200 and body["id"] == world.runner and body["pod"] == "intruder", body
            assert {label: others(label, rows) for label, rows in after.items()} == {
                label: others(label, rows) for label, rows in before.items()
            }


# The checks that may write, each asserting what it wrote; every other check writes nothing.
WRITING_CHECKS = (expect_run_create_scoped, expect_task_create_scoped, expect_runner_scoped)


def visible_worlds(fx: Fixture, key_scope: str) -> list[World]:
    return [fx.worlds[name] for name in VISIBLE[key_scope]]


def walk(api: KeyClient, path: str, *, by: str, **params) -> list[dict]:
    """Every item of a paged list: by `pageToken` (the sorted view) or by `cursor` (the feed)."""
    items, page_params = [], dict(params)
    for _ in range(50):
        status, page = api.get(path, **page_params)
        assert status == 200, page
        items += page["items"]
        if by == "pageToken":
            if page["nextPageToken"] is None:
                return items
            page_params["pageToken"] = page["nextPageToken"]
        else:
            if not page["items"]:
                return items
            page_params["cursor"] = page["cursor"]
    raise AssertionError(f"{path} did not end")


def expect_sessions_listed_in_scope(fx: Fixture, method: str, case: Case, key_scope: str, world: World) -> None:
    """The inbox and the change feed hold the key's sessions, all of them, and no one else's."""
    from sessions.models import Session

    own = set().union(*(w.sessions for w in visible_worlds(fx, key_scope)))
    top = max(Session.objects.filter(pk__in=own).values_list("version", flat=True))
    for role in roles_for(case, key_scope):
        api = key_of(fx, key_scope, role)
        listed = walk(api, "sessions", by="pageToken", state="all", backendProfile="echo", readerId="reader-1", limit=2)
        assert sorted(item["sessionId"] for item in listed) == sorted(own)
        listed = walk(api, "sessions", by="cursor", state="all", cursor="0", limit=3)
        assert sorted(item["sessionId"] for item in listed) == sorted(own)
        for params in ({"readerId": "reader-1"}, {"state": "idle"}):
            status, page = api.get("sessions", **params)
            assert status == 200 and {item["sessionId"] for item in page["items"]} <= own, (params, page)
        # The watermark is the key's own highest version, not the server's.
        status, page = api.get("sessions", state="all")
        assert page["cursor"] == str(top)
        assert all((item["tenantId"], item["projectId"]) != (world.tenant, world.project) for item in page["items"])


def expect_tasks_listed_in_scope(fx: Fixture, method: str, case: Case, key_scope: str, world: World) -> None:
    """The priority view and the change feed hold the key's tasks, all of them, and no one else's."""
    from queues.models import QueueTask

    own = set().union(*(w.tasks for w in visible_worlds(fx, key_scope)))
    top = max(QueueTask.objects.filter(pk__in=own).values_list("version", flat=True))
    for role in roles_for(case, key_scope):
        api = key_of(fx, key_scope, role)
        listed = walk(api, "queue-tasks", by="pageToken", queue="default", limit=2)
        assert sorted(task["id"] for task in listed) == sorted(own)
        listed = walk(api, "queue-tasks", by="cursor", updatedAfter="0", limit=3)
        assert sorted(task["id"] for task in listed) == sorted(own)
        for params in ({"state": "pending"}, {"state": "cancelled"}):
            status, page = api.get("queue-tasks", **params)
            assert status == 200 and page["count"] == len(visible_worlds(fx, key_scope)), (params, page)
            assert {t["id"] for t in page["items"]} <= own
        status, page = api.get("queue-tasks")
        assert page["cursor"] == str(top)


def expect_stats_in_scope(fx: Fixture, method: str, case: Case, key_scope: str, world: World) -> None:
    """Counts and the highest version are the key's own: another tenant's activity does not show."""
    from queues.models import QueueTask

    own = set().union(*(w.tasks for w in visible_worlds(fx, key_scope)))
    top = max(QueueTask.objects.filter(pk__in=own).values_list("version", flat=True))
    worlds = len(visible_worlds(fx, key_scope))
    for role in roles_for(case, key_scope):
        for params in ({}, {"queue": "default"}):
            status, stats = key_of(fx, key_scope, role).get("queues/stats", **params)
            assert status == 200, stats
            assert (stats["total"], stats["maxVersion"]) == (len(own), top), (params, stats)
            assert stats["byState"] == {"pending": worlds, "cancelled": worlds}
            assert stats["byLane"] == {"default": len(own)}


def expect_commander_in_scope(fx: Fixture, method: str, case: Case, key_scope: str, world: World) -> None:
    """The snapshot's items and stats are the key's own tasks, with or without a reader."""
    own = set().union(*(w.tasks for w in visible_worlds(fx, key_scope)))
    pending = {w.task for w in visible_worlds(fx, key_scope)}
    for role in roles_for(case, key_scope):
        api = key_of(fx, key_scope, role)
        for params, expected in (
            ({}, own),
            ({"queue": "default"}, own),
            ({"readerId": "reader-1"}, pending),
            ({"readerId": "reader-2"}, own),
        ):
            status, snapshot = api.get("queues/commander", **params)
            assert status == 200, snapshot
            assert {t["id"] for t in snapshot["items"]} == expected, params
            assert snapshot["stats"]["total"] == len(own)


def expect_session_events_in_scope(fx: Fixture, method: str, case: Case, key_scope: str, world: World) -> None:
    """Another tenant's session is 404; so is another tenant's run named as `runId` of one's own
    session (or, on a stream, in `Last-Event-ID`)."""
    expect_404(fx, method, case, key_scope, world)
    mine = visible_worlds(fx, key_scope)[0]
    path = case.path.format(session=mine.session)
    for role in roles_for(case, key_scope):
        api = key_of(fx, key_scope, role)
        assert_error(*api.get(path, runId=world.run), 404, "schema-invalid")
        status, page = api.get(path)
        if path.endswith("/stream"):
            assert_error(*api._send("get", path, HTTP_LAST_EVENT_ID=f"{world.run}:1"), 404, "schema-invalid")
            assert status == 200 and page["stream"].startswith("retry: "), page
            continue
        assert status == 200 and page["runId"] == mine.run and page["count"] >= 1, page
        assert all(f"of {world.tag}" not in json.dumps(item) for item in page["items"])


def expect_same_answer(fx: Fixture, method: str, case: Case, key_scope: str, world: World) -> None:
    """Not a tenant's data: every key gets the same answer."""
    owner = key_of(fx, "acme/web", CLIENT).get(case.path)
    for role in roles_for(case, key_scope):
        assert key_of(fx, key_scope, role).get(case.path) == owner


def lease(world: World) -> dict:
    return world.lease


def finish(world: World) -> dict:
    return {**world.lease, "terminalStatus": "completed"}


C, R, CR, NONE = frozenset({CLIENT}), frozenset({RUNNER}), frozenset({CLIENT, RUNNER}), frozenset()

# (route as the URL conf spells it, {pk} for the id; method) -> its case.
ROUTES: dict[tuple[str, str], Case] = {
    ("backends", "GET"): Case("backends", CR, 200, stranger=expect_same_answer),
    ("runs", "POST"): Case("runs", C, 201, lambda w: {"backendProfile": "echo"}, expect_run_create_scoped),
    ("runs/{pk}", "GET"): Case("runs/{run}", CR, 200),
    ("runs/{pk}/cancel", "POST"): Case("runs/{run}/cancel", C, 200, lambda w: {"reason": "stop"}),
    ("runs/{pk}/claim", "POST"): Case("runs/{run}/claim", R, 200, lambda w: {"runnerId": w.runner, "leaseMs": 60_000}),
    ("runs/{pk}/heartbeat", "POST"): Case("runs/{run}/heartbeat", R, 200, lambda w: {**w.lease, "leaseMs": 60_000}),
    ("runs/{pk}/finish", "POST"): Case("runs/{run}/finish", R, 200, finish),
    ("runs/{pk}/events", "GET"): Case("runs/{run}/events", CR, 200),
    ("runs/{pk}/events", "POST"): Case(
        "runs/{run}/events", R, 201, lambda w: {**w.lease, "type": "usage", "payload": {"outputTokens": 1}}
    ),
    ("runs/{pk}/events/stream", "GET"): Case("runs/{run}/events/stream", CR, 200),
    ("runs/{pk}/commands", "GET"): Case("runs/{run}/commands", CR, 200),
    ("runs/{pk}/commands", "POST"): Case(
        "runs/{run}/commands", C, 201, lambda w: {"type": "turn", "payload": {"prompt": "more"}}
    ),
    ("runs/{pk}/runner-jobs", "GET"): Case("runs/{run}/runner-jobs", R, 200),
    ("runs/{pk}/runner-jobs", "POST"): Case("runs/{run}/runner-jobs", R, 201, lambda w: w.job_body()),
    ("commands/{pk}", "GET"): Case("commands/{command}", CR, 200),
    ("commands/{pk}/ack", "POST"): Case("commands/{command}/ack", R, 200, lease),
    ("commands/{pk}/finish", "POST"): Case("commands/{command}/finish", R, 200, finish),
    ("commands/{pk}/cancel", "POST"): Case("commands/{command}/cancel", C, 200, lambda w: {"reason": "stop"}),
    ("runners", "POST"): Case("runners", R, 201, lambda w: {"runnerId": "runner-new"}, expect_runner_scoped),
    ("sessions", "GET"): Case("sessions", C, 200, stranger=expect_sessions_listed_in_scope),
    ("sessions/{pk}", "GET"): Case("sessions/{session}", C, 200),
    ("sessions/{pk}", "PUT"): Case(
        "sessions/{session}", C, 200, lambda w: {"backendProfile": "echo", "metadata": {}}, expect_policy_denied_put
    ),
    ("sessions/{pk}/read", "POST"): Case("sessions/{session}/read", C, 200, lambda w: {"readerId": "reader-2"}),
    ("sessions/{pk}/trace", "GET"): Case("sessions/{session}/trace", C, 200, stranger=expect_session_events_in_scope),
    ("sessions/{pk}/output", "GET"): Case("sessions/{session}/output", C, 200, stranger=expect_session_events_in_scope),
    ("sessions/{pk}/output/stream", "GET"): Case(
        "sessions/{session}/output/stream", C, 200, stranger=expect_session_events_in_scope
    ),
    ("sessions/{pk}/storage", "POST"): Case(
        "sessions/{session}/storage", R, 200, lambda w: {"storageKind": "pvc", "pvcName": f"{w.pvc}-new"}
    ),
    ("sessions/{pk}/storage/evict", "POST"): Case(
        "sessions/{session}/storage/evict", R, 200, lambda w: {"pvcName": w.pvc}
    ),
    ("queue-tasks", "GET"): Case("queue-tasks", C, 200, stranger=expect_tasks_listed_in_scope),
    ("queue-tasks", "POST"): Case(
        "queue-tasks", C, 201, lambda w: {"queue": "default", "backendProfile": "echo"}, expect_task_create_scoped
    ),
    ("queue-tasks/{pk}", "GET"): Case("queue-tasks/{task}", C, 200),
    ("queue-tasks/{pk}/attempt", "POST"): Case(
        "queue-tasks/{task}/attempt", NONE, 200, lambda w: {"state": "running", "latestAttempt": {"runId": w.run}}
    ),
    ("queue-tasks/{pk}/cancel", "POST"): Case("queue-tasks/{task}/cancel", C, 200, lambda w: {"reason": "stop"}),
    ("queue-tasks/{pk}/read", "POST"): Case("queue-tasks/{task}/read", C, 200, lambda w: {"readerId": "reader-2"}),
    ("queues/stats", "GET"): Case("queues/stats", C, 200, stranger=expect_stats_in_scope),
    ("queues/commander", "GET"): Case("queues/commander", C, 200, stranger=expect_commander_in_scope),
}


# --- the URL conf --------------------------------------------------------------------------------


def _patterns(patterns, prefix=""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _patterns(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            assert isinstance(pattern, URLPattern)
            yield prefix + str(pattern.pattern), pattern.callback


def _route(pattern: str) -> str:
    """`api/v1/^runs/(?P<pk>[^/]+)/claim/?$` -> `runs/{pk}/claim`; anything else stays as written."""
    route = pattern.removeprefix(API_PREFIX)
    if route.startswith("^") and route.endswith("/?$"):
        route = route[1:-3].replace("(?P<pk>[^/]+)", "{pk}")
    return route


def _methods(callback) -> set[str]:
    actions = getattr(callback, "actions", None)  # a viewset route: method -> action
    if actions is None:
        view = callback.view_class
        actions = {name: name for name in view.http_method_names if hasattr(view, name)}
    # HEAD answers as GET does; OPTIONS describes the route: neither is a route of its own.
    return {method.upper() for method in actions if method not in ("head", "options")}


def url_conf_routes() -> dict[tuple[str, str], object]:
    routes = {}
    for pattern, callback in _patterns(get_resolver().url_patterns):
        if not pattern.startswith(API_PREFIX) or _route(pattern) in SKIPPED:
            continue
        for method in _methods(callback):
            routes[(_route(pattern), method)] = callback
    return routes


def test_every_route_has_a_case():
    """A route added to the URL conf without a case here fails: give it one in ROUTES."""
    assert set(url_conf_routes()) == set(ROUTES)


def test_skipped_routes_need_no_key():
    skipped = {}
    for pattern, callback in _patterns(get_resolver().url_patterns):
        if pattern.startswith(API_PREFIX) and _route(pattern) in SKIPPED:
            # A view's own attributes, as as_view() may have overridden them.
            skipped[_route(pattern)] = {**vars(callback.view_class), **callback.initkwargs}
    assert set(skipped) == SKIPPED
    for route, view in skipped.items():
        assert view["authentication_classes"] == [] and view["permission_classes"] == [], route


def test_case_paths_name_their_route():
    for (route, _), case in ROUTES.items():
        assert case.path.replace("{" + str(case.target) + "}", "{pk}") == route


# --- owners, roles, strangers --------------------------------------------------------------------

OWNER_CALLS = [
    (route, method, role) for (route, method), case in ROUTES.items() for role in sorted(case.roles | {OPERATOR})
]
RUN_KEY_CALLS = [(route, method) for (route, method), case in ROUTES.items() if RUNNER in case.roles]
ROLE_REFUSALS = [
    (route, method, key_scope, role)
    for (route, method), case in ROUTES.items()
    for key_scope, role in (("acme/web", CLIENT), ("acme/web", RUNNER), ("run:acme/web", RUNNER))
    if role not in case.roles
]
STRANGER_CALLS = [
    (route, method, stranger)
    for (route, method), case in ROUTES.items()
    for stranger, (key_scope, _) in STRANGERS.items()
    if roles_for(case, key_scope)
]


def _id(value):
    return value if isinstance(value, str) else None


@pytest.mark.parametrize(("route", "method", "role"), OWNER_CALLS, ids=_id)
def test_owner_reaches_route(fx, route, method, role):
    """The case is right: its path and body work for a key of the target's own scope."""
    case = ROUTES[(route, method)]
    status, body = send(key_of(fx, "acme/web", role), method, case, fx.worlds["acme/web"])
    assert status == case.ok, body


@pytest.mark.parametrize(("route", "method"), RUN_KEY_CALLS, ids=_id)
def test_run_scoped_key_reaches_its_run(fx, route, method):
    case = ROUTES[(route, method)]
    status, body = send(key_of(fx, "run:acme/web", RUNNER), method, case, fx.worlds["acme/web"])
    assert status == case.ok, body


@pytest.mark.parametrize(("route", "method", "key_scope", "role"), ROLE_REFUSALS, ids=_id)
def test_role_outside_api_md_is_forbidden(fx, route, method, key_scope, role):
    case = ROUTES[(route, method)]
    before = tables()
    assert_error(*send(key_of(fx, key_scope, role), method, case, fx.worlds["acme/web"]), 403, "forbidden")
    assert tables() == before


@pytest.mark.parametrize(("route", "method", "stranger"), STRANGER_CALLS, ids=_id)
def test_stranger_reaches_nothing(fx, route, method, stranger):
    case = ROUTES[(route, method)]
    key_scope, target = STRANGERS[stranger]
    check = case.stranger or expect_404
    before = tables()
    check(fx, method, case, key_scope, fx.worlds[target])
    if check not in WRITING_CHECKS:
        assert tables() == before


# --- a runner job's id in the body -----------------------------------------------------------------

# (key scope, the world whose job id the body names): a job outside the key's scope.
FOREIGN_JOBS = [("acme/web", "other/x"), ("acme/web", "acme/other-project"), ("run:acme/web", "acme/web#2")]


def _post_job(fx: Fixture, key_scope: str, job_of: str):
    mine = fx.worlds["acme/web"]
    return key_of(fx, key_scope, RUNNER).post(f"runs/{mine.run}/runner-jobs", mine.job_body(id=fx.worlds[job_of].job))


@pytest.mark.parametrize(("key_scope", "job_of"), FOREIGN_JOBS)
def test_runner_job_id_outside_scope_writes_nothing(fx, key_scope, job_of):
    before = tables()
    status, body = _post_job(fx, key_scope, job_of)
    assert status == 404, body
    assert tables() == before


@pytest.mark.parametrize(("key_scope", "job_of"), FOREIGN_JOBS)
def test_runner_job_id_outside_scope_is_404(fx, key_scope, job_of):
    """API.md: an object of another tenant or project, or another run for a run-scoped key, is 404."""
    assert_error(*_post_job(fx, key_scope, job_of), 404, "schema-invalid")
