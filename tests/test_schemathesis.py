"""The OpenAPI schema tells the truth: schemathesis generates requests from /api/v1/schema/ for
every operation and checks each answer against it (no 5xx, a documented status, a documented
content type, a body that matches the documented schema).

The requests go in-process through the WSGI application, with a key of the role the route is for,
against a committed world built for each operation (a claimed run with a turn, its session
`owner/repo#42-<n>`, a pending run, a queue task). Generated path ids are swapped for the world's
ids, and lease fields for the run's holder, often enough to get past 404 and 409 into the routes'
own work; negative cases (a required header dropped, a value out of its schema) stay as generated.

`make test` runs a bounded, seeded number of cases per operation; `make fuzz` runs many more with a
random seed (`AGENTRUN_FUZZ_EXAMPLES`, `AGENTRUN_FUZZ_SEED`; the seed is printed to reproduce a run).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest
import schemathesis
from django.core.management import call_command
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.urls import resolve
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agentrun.auth import api_key_create, key_cache
from queues import services as queue_services
from runs import services as run_services
from runs.models import Command, Run

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = int(os.environ.get("AGENTRUN_FUZZ_EXAMPLES", "20"))
# The coverage phase (boundary values of every parameter, unexpected methods) takes seconds per
# operation to build, at collection: `make fuzz` runs it, the suite does not.
COVERAGE = EXAMPLES > 100
SEED = int(os.environ.get("AGENTRUN_FUZZ_SEED") or (random.SystemRandom().getrandbits(32) if EXAMPLES > 100 else 1729))
TENANT, PROJECT = "acme", "web"
RUNNER_ID = "fuzz-runner"
SESSION_ID = "owner/repo#42"


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "generation": {"max-examples": EXAMPLES, "mode": "all", "database": "none"},
        "phases": {
            "examples": {"enabled": False},
            "coverage": {"enabled": COVERAGE},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
    }
)
schema = schemathesis.openapi.from_wsgi("/api/v1/schema/?format=json", get_wsgi_application(), config=CONFIG)


@dataclass
class World:
    """What the generated requests aim at, rebuilt for each operation's test."""

    keys: dict[str, str] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)

    def ids_for(self, path: str) -> list[str]:
        resource = path.removeprefix("/api/v1/").split("/", 1)[0]
        return {"runs": self.runs, "commands": self.commands, "sessions": self.sessions, "queue-tasks": self.tasks}.get(
            resource, []
        )


WORLD = World()
CASES: Counter[str] = Counter()
STATUSES: Counter[tuple[str, int]] = Counter()


def role_for(method: str, path: str) -> str | None:
    """The role a route is for, from its view's `roles` (agentrun.auth.RolePermission): client
    when a client may call it, else runner, else operator; None for a public route."""
    match = resolve(path.replace("{id}", "x"))
    view = match.func
    roles = getattr(getattr(view, "cls", None), "roles", None)
    if roles is None:
        return None
    actions = getattr(view, "actions", None) or {}
    action = actions.get(method.lower(), method.lower())
    allowed = roles.get(f"{action}:{method.upper()}", roles.get(action, ()))
    return next((role for role in ("client", "runner") if role in allowed), "operator")


def _lease_epoch(path: str, target: str | None) -> int:
    if path.startswith("/api/v1/commands/"):
        target = Command.objects.filter(pk=target).values_list("run_id", flat=True).first()
    epoch = Run.objects.filter(pk=target).values_list("lease_epoch", flat=True).first()
    return epoch if epoch is not None else 1


def _aim(case, choice: int, index: int):
    """Swap the generated id for one of the world's (choice 1, 2) and the lease fields for the
    run's holder (choice 2). Choice 0 keeps the generated request."""
    if choice == 0:
        return case
    ids = WORLD.ids_for(case.operation.path)
    target = None
    if ids and isinstance(case.path_parameters, dict) and "id" in case.path_parameters:
        target = ids[index % len(ids)]
        # Generated path values are already percent-encoded; `owner/repo#42` must be too.
        case.path_parameters = {**case.path_parameters, "id": quote(target, safe="")}
    if choice == 2 and isinstance(case.body, dict) and "runnerId" in case.body:
        case.body = {**case.body, "runnerId": RUNNER_ID, "leaseEpoch": _lease_epoch(case.operation.path, target)}
        if "commandId" in case.body and WORLD.commands:
            case.body["commandId"] = WORLD.commands[index % len(WORLD.commands)]
    return case


@schema.hook
def flatmap_case(context, case):
    # Hypothesis favours the first choice: aim at the world with a live lease.
    return st.tuples(st.just(case), st.sampled_from([2, 1, 0]), st.integers(0, 7)).map(_aim_drawn)


def _aim_drawn(drawn):
    return _aim(*drawn)


@pytest.fixture(scope="module")
def fuzz_db(django_db_setup, django_db_blocker):
    """The module's database: the cases' writes are committed, as the server commits them, and
    every table is emptied once, after the last operation. A key per role. Requests keep the
    test's database connection, as with Django's test client."""
    with django_db_blocker.unblock():
        WORLD.keys = {
            role: api_key_create(tenant_id=TENANT, project_id=PROJECT, role=role)[1]
            for role in ("client", "runner", "operator")
        }
        request_started.disconnect(close_old_connections)
        request_finished.disconnect(close_old_connections)
        try:
            yield
        finally:
            request_started.connect(close_old_connections)
            request_finished.connect(close_old_connections)
            key_cache.clear()
            call_command("flush", verbosity=0, interactive=False)


@pytest.fixture
def transactional_db(fuzz_db):
    """pytest-django's `transactional_db`, overridden for this module: it empties the database
    after every test, 0.3 s for each of the operations; `fuzz_db` does it once."""


@pytest.fixture
def world(transactional_db, settings):
    """Fresh targets for one operation's cases (which share and change them): a run claimed by
    RUNNER_ID with a pending turn and a session whose id holds a slash, a pending run, a queue
    task. Keys are cached; long-polls wait at most 20 ms."""
    settings.AGENTRUN_MAX_WAIT_SECONDS = 0.02
    settings.AGENTRUN_AUTH_CACHE_SECONDS = 600
    session_id = f"{SESSION_ID}-{len(CASES)}"
    claimed, _ = run_services.run_create(
        tenant_id=TENANT, project_id=PROJECT, backend_profile="echo", session_ref={"sessionId": session_id}
    )
    run_services.run_claim(run_id=claimed.id, runner_id=RUNNER_ID, lease_ms=600_000)
    command, _ = run_services.command_create(run_id=claimed.id, command_type="turn", payload={"prompt": "hi"})
    pending, _ = run_services.run_create(tenant_id=TENANT, project_id=PROJECT, backend_profile="codex")
    task, _ = queue_services.task_create(
        tenant_id=TENANT, project_id=PROJECT, queue="q", lane="default", title="t", priority=0, backend_profile="echo"
    )
    WORLD.runs, WORLD.commands = [claimed.id, pending.id], [command.id]
    WORLD.sessions, WORLD.tasks = [session_id], [task.id]
    yield WORLD
    WORLD.runs, WORLD.commands, WORLD.sessions, WORLD.tasks = [], [], [], []


@schema.parametrize()
# The cases of one operation share (and change) its world.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
def test_every_operation_answers_as_documented(case, world):
    role = role_for(case.method, case.operation.path)
    headers = {"Authorization": f"Bearer {world.keys[role]}"} if role else {}
    CASES[case.operation.label] += 1
    response = case.call_and_validate(headers=headers, checks=CHECKS)
    STATUSES[(case.operation.label, response.status_code)] += 1


@pytest.fixture(scope="module", autouse=True)
def _report_cases(request):
    """How many cases ran, and how long they took, on the terminal (AGENTRUN_FUZZ_STATUSES=1: the
    statuses each operation answered)."""
    started = time.monotonic()
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not CASES:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(
            f"\nschemathesis: {sum(CASES.values())} cases over {len(CASES)} operations in "
            f"{time.monotonic() - started:.1f} s (seed {SEED}, {EXAMPLES} examples per operation)"
        )
        if os.environ.get("AGENTRUN_FUZZ_STATUSES"):
            for label in CASES:
                statuses = sorted((code, n) for (name, code), n in STATUSES.items() if name == label)
                reporter.write_line(f"  {label}: " + ", ".join(f"{code} x{n}" for code, n in statuses))
