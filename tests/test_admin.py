"""Operators in Django admin: runs with read-only commands and events, the cancel action, API keys."""

from __future__ import annotations

import re

import pytest
from django.contrib.admin.utils import quote
from django.test import Client

from agentrun.auth import hash_key
from agentrun.models import ApiKey
from runs import services
from runs.models import Run
from tests.helpers import make_run

pytestmark = pytest.mark.django_db


def test_run_changelist_filters_and_search(staff):
    run = make_run(session_id="adm1")
    other = make_run(backend="codex")
    response = staff.get("/admin/runs/run/", {"status__exact": "pending", "backend_profile__exact": "echo"})
    assert response.status_code == 200
    body = response.content.decode()
    assert run.id in body and other.id not in body
    response = staff.get("/admin/runs/run/", {"q": other.id})
    assert other.id in response.content.decode() and run.id not in response.content.decode()


def test_run_change_page_shows_commands_and_recent_events_read_only(staff):
    run = make_run()
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    command, _ = services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "hello"})
    services.event_append(
        run_id=run.id, runner_id="r", lease_epoch=1, events=[("assistant_message", {"n": n}) for n in range(60)]
    )
    response = staff.get(f"/admin/runs/run/{quote(run.id)}/change/")
    assert response.status_code == 200
    body = response.content.decode()
    assert command.id in body and "run-created" not in body  # only the last 50 events
    assert '"n": 59' in body or "&quot;n&quot;: 59" in body
    assert 'name="commands-0-state"' not in body  # inlines are read-only


def test_cancel_action_calls_the_service(staff):
    run = make_run()
    response = staff.post("/admin/runs/run/", {"action": "cancel_runs", "_selected_action": [run.id]}, follow=True)
    assert response.status_code == 200
    stored = Run.objects.get(pk=run.id)
    assert stored.status == "cancelled" and stored.failure_message.startswith("cancelled by operator")


def test_api_key_created_in_admin_is_shown_once_and_stored_hashed(staff):
    response = staff.post(
        "/admin/agentrun/apikey/add/",
        {"name": "ci", "tenant_id": "acme", "project_id": "", "role": "client", "run_id": ""},
        follow=True,
    )
    assert response.status_code == 200
    message = next(str(m) for m in response.context["messages"] if "shown once" in str(m))
    raw = message.rsplit(" ", 1)[-1]
    key = ApiKey.objects.get(name="ci")
    assert key.key_hash == hash_key(raw) and raw not in (key.prefix, key.key_hash)
    assert key.project_id is None


def test_revoke_action(staff):
    from agentrun.auth import api_key_create

    key, _ = api_key_create(tenant_id="acme", role="runner")
    staff.post("/admin/agentrun/apikey/", {"action": "revoke", "_selected_action": [key.pk]}, follow=True)
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_site_middleware_runs_for_admin_and_not_for_the_api():
    client = Client(enforce_csrf_checks=True)
    login = client.get("/admin/login/")
    assert login.status_code == 200 and "csrftoken" in login.cookies and login["X-Frame-Options"] == "DENY"
    # Without the CSRF token the admin refuses a form post; the API never asks for one.
    assert client.post("/admin/login/", {"username": "x", "password": "y"}).status_code == 403
    api = Client(enforce_csrf_checks=True)
    response = api.get("/api/v1/health")
    assert response.status_code == 200 and not response.cookies and "X-Frame-Options" not in response


# --- sessions --------------------------------------------------------------------------------


def _session_setup():
    from sessions import services as session_services

    run = make_run(session_id="adm-s1", session_ref={"metadata": {"title": "Payments bug"}})
    services.run_claim(run_id=run.id, runner_id="r", lease_ms=60_000)
    services.event_append(run_id=run.id, runner_id="r", lease_epoch=1, events=[("assistant_message", {"n": 7})])
    session_services.session_upsert(session_id="adm-s2", tenant_id="acme", project_id="web", backend_profile="codex")
    session_services.session_storage_refresh(
        session_id="adm-s1", storage_kind="pvc", pvc_name="pvc-adm", namespace="agents"
    )
    return run


def test_session_changelist_filters_and_search(staff):
    from sessions.models import Session

    _session_setup()
    Session.objects.filter(pk="adm-s1").update(expires_at="2000-01-01T00:00:00Z")
    body = staff.get("/admin/agent_sessions/session/", {"storage_kind__exact": "pvc"}).content.decode()
    assert "adm-s1" in body and "adm-s2" not in body
    body = staff.get("/admin/agent_sessions/session/", {"backend_profile__exact": "codex"}).content.decode()
    assert "adm-s2" in body and "adm-s1" not in body
    body = staff.get("/admin/agent_sessions/session/", {"expired": "yes"}).content.decode()
    assert "adm-s1" in body and "adm-s2" not in body
    body = staff.get("/admin/agent_sessions/session/", {"q": "Payments"}).content.decode()
    assert "adm-s1" in body and "adm-s2" not in body
    body = staff.get("/admin/agent_sessions/session/", {"execution_state__exact": "idle"}).content.decode()
    assert "adm-s1" in body and "adm-s2" in body


def test_session_change_page_shows_runs_events_and_storage(staff):
    run = _session_setup()
    response = staff.get("/admin/agent_sessions/session/adm-s1/change/")
    assert response.status_code == 200
    body = response.content.decode()
    assert run.id in body and "pvc-adm" in body and "assistant_message" in body
    assert f"/admin/runs/run/{quote(run.id)}/change/" in body


def test_mark_read_for_me_action(staff):
    from sessions.models import SessionReadCursor

    _session_setup()
    staff.post("/admin/agent_sessions/session/", {"action": "mark_read", "_selected_action": ["adm-s1", "adm-s2"]})
    cursors = SessionReadCursor.objects.filter(reader_id="ops")
    assert sorted(cursors.values_list("session_id", flat=True)) == ["adm-s1", "adm-s2"]


def test_evict_storage_asks_first_then_deletes_the_pvc(staff, fake_kube):
    from sessions.models import Session

    _session_setup()
    selected = {"action": "evict_storage", "_selected_action": ["adm-s1", "adm-s2"]}
    response = staff.post("/admin/agent_sessions/session/", selected)
    assert response.status_code == 200 and "agents/pvc-adm" in response.content.decode()
    assert Session.objects.get(pk="adm-s1").storage_kind == "pvc"  # nothing yet: it asked
    fake_kube.pvc("agents", "pvc-adm")
    response = staff.post("/admin/agent_sessions/session/", {**selected, "confirmed": "yes"}, follow=True)
    assert "Evicted the storage of 1 session(s)." in response.content.decode()
    assert Session.objects.get(pk="adm-s1").storage_kind == "evicted"
    assert [path for _, path in fake_kube.calls] == ["/api/v1/namespaces/agents/persistentvolumeclaims/pvc-adm"]


# --- queues ----------------------------------------------------------------------------------


def test_queue_task_admin_filters_shows_attempts_and_runs(staff):
    from queues import services as queue_services
    from tests.helpers import make_task

    task = make_task("builds", lane="nightly", priority=1)
    other = make_task("other")
    started = queue_services.dispatch_one()
    body = staff.get("/admin/queues/queuetask/", {"queue__exact": "builds"}).content.decode()
    assert task.id in body and other.id not in body
    body = staff.get("/admin/queues/queuetask/", {"state__exact": "pending"}).content.decode()
    assert other.id in body and task.id not in body
    response = staff.get(f"/admin/queues/queuetask/{quote(task.id)}/change/")
    body = response.content.decode()
    assert response.status_code == 200, (response.status_code, response.get("Location"), started)
    assert started.run_id in body and f"/admin/runs/run/{quote(started.run_id)}/change/" in body


def test_queue_task_cancel_and_retry_actions(staff):
    from queues import services as queue_services
    from queues.models import QueueTask
    from runs.models import Run
    from tests.helpers import make_task

    task = make_task()
    started = queue_services.dispatch_one()
    staff.post("/admin/queues/queuetask/", {"action": "cancel_tasks", "_selected_action": [task.id]})
    assert QueueTask.objects.get(pk=task.id).state == "cancelled"
    assert Run.objects.get(pk=started.run_id).status == "cancelled"
    staff.post("/admin/queues/queuetask/", {"action": "retry_tasks", "_selected_action": [task.id]})
    assert QueueTask.objects.get(pk=task.id).state == "pending"


def test_queue_limits_and_pause_are_edited_in_admin(staff):
    from queues.models import Queue

    queue = Queue.objects.create(tenant_id="acme", name="builds")
    response = staff.post(
        f"/admin/queues/queue/{queue.pk}/change/",
        {"tenant_id": "acme", "name": "builds", "max_running": "4", "paused": "on"},
    )
    assert response.status_code == 302
    queue.refresh_from_db()
    assert (queue.max_running, queue.paused) == (4, True)


def test_admin_links_reach_runs_whose_ids_look_like_admin_escapes(staff, monkeypatch):
    """The admin reads `_22` in a URL as `"`: a run id such as `run_22…` must travel quoted, in
    the session page's links and the queue task's, or its link lands on "doesn't exist"."""
    from runs.services import runs as run_services

    monkeypatch.setattr(run_services, "new_id", lambda prefix: f"{prefix}_22{'ab' * 15}")
    run = make_run(session_id="adm-escape")
    assert run.id == "run_22" + "ab" * 15
    body = staff.get("/admin/agent_sessions/session/adm-escape/change/").content.decode()
    [link] = re.findall(r"href='(/admin/runs/run/[^']+/change/)'", body)
    response = staff.get(link)
    assert response.status_code == 200, (response.status_code, response.get("Location"))
    assert run.id in response.content.decode()
