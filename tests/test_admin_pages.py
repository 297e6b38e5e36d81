"""The operators' dashboard: staff only, linked from the index, and its figures."""

from __future__ import annotations

import pytest
from django.test import Client

from runs.models import Run
from tests.helpers import make_run

pytestmark = pytest.mark.django_db


def test_dashboard_is_staff_only_and_linked_from_the_index(staff):
    assert Client().get("/admin/dashboard/").status_code == 302
    assert "/admin/dashboard/" in staff.get("/admin/").content.decode()
    assert staff.get("/admin/dashboard/").status_code == 200


def test_dashboard_counts_runs_by_status_and_failures_by_kind(staff):
    for _ in range(3):
        make_run()
    failed = make_run()
    Run.objects.filter(pk=failed.pk).update(status="failed", failure_kind="oom_killed")
    body = staff.get("/admin/dashboard/").content.decode()
    assert '<td class="hour-pending">3</td>' in body and '<td class="day-failed">1</td>' in body
    assert "oom_killed" in body and "failure_kind=oom_killed" in body and failed.id in body


def populate(count: int) -> None:
    """`count` of everything an admin page lists: sessions with runs, commands, events, runner
    jobs, queue tasks with attempts, webhook deliveries, keys, bundles."""
    from queues.dispatcher import Dispatcher
    from runs import services
    from tests.helpers import claim, make_key, make_task

    for index in range(count):
        run = make_run(session_id=f"pages-{count}-{index}", webhook_url="https://hooks.example.com/x")
        services.command_create(run_id=run.id, command_type="turn", payload={"prompt": f"p{index}"})
        claim(run, runner_id=f"r{index}")
        services.runner_job_save(
            run_id=run.id,
            fields={
                "command_id": "",
                "payload_hash": "h",
                "attempt_id": "1",
                "runner_id": f"r{index}",
                "namespace": "ns",
                "job_name": f"job-{count}-{index}",
                "manager_url": "http://m",
                "image": "i",
                "source_commit": "",
                "result": {},
            },
        )
        services.run_cancel(run_id=run.id)
        make_task(f"pages-{count}", webhook_url="https://hooks.example.com/t")
        make_key("client")
    Dispatcher().run_once()


def admin_pages() -> list[str]:
    from django.contrib import admin
    from django.urls import reverse

    return [
        reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist") for model in admin.site._registry
    ]


def change_pages() -> list[str]:
    """The change page of the newest object of every registered model that has one."""
    from django.contrib import admin
    from django.contrib.admin.utils import quote
    from django.urls import reverse

    pages = []
    for model in admin.site._registry:
        obj = model._default_manager.order_by("-pk").first()
        if obj is not None:
            name = f"admin:{model._meta.app_label}_{model._meta.model_name}_change"
            pages.append(reverse(name, args=[quote(obj.pk)]))
    return pages


def queries_of(client, paths) -> dict[str, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    counts = {}
    for path in paths:
        with CaptureQueriesContext(connection) as captured:
            response = client.get(path)
        assert response.status_code == 200, (path, response.status_code)
        counts[path] = len(captured)
    return counts


def test_no_admin_list_makes_a_query_per_row(staff):
    """Every changelist, and the dashboard, with 2 rows of everything and with 12: the same
    number of queries (list_select_related, subqueries, no per-row lookups)."""
    paths = [*admin_pages(), "/admin/dashboard/", "/admin/"]
    populate(2)
    queries_of(staff, paths)  # the first look at each (a session's first save, caches)
    few = queries_of(staff, paths)
    populate(10)
    many = queries_of(staff, paths)
    assert many == few


def test_no_change_page_makes_a_query_per_related_row(staff):
    """Every model's change page, and a run's with 1 command or 6 (its inlines): the same
    queries whatever the number of related rows."""
    from django.contrib.admin.utils import quote

    from runs import services

    populate(1)
    run = make_run()
    services.command_create(run_id=run.id, command_type="turn", payload={"prompt": "first"})
    pages = [*change_pages(), f"/admin/runs/run/{quote(run.id)}/change/"]
    queries_of(staff, pages)  # the first look at each (a session's first save, caches)
    few = queries_of(staff, pages)
    for index in range(5):
        services.command_create(run_id=run.id, command_type="steer", payload={"prompt": f"more {index}"})
    many = queries_of(staff, pages)
    assert many == few


def test_pages_link_session_runs_commands_jobs_tasks_and_deliveries(staff):
    from django.contrib.admin.utils import quote

    from agentrun.models import WebhookDelivery
    from queues.models import QueueTask
    from runs.models import Command, RunnerJob
    from sessions.models import Session

    def change(view, object_id):
        return f"/admin/{view}/{quote(object_id)}/change/"

    populate(1)
    run = Run.objects.filter(session_id__startswith="pages-").get()
    session = Session.objects.get(pk=run.session_id)
    Session.objects.filter(pk=session.pk).update(title="Fix the login bug")
    runs_page = staff.get("/admin/runs/run/").content.decode()
    assert "Fix the login bug" in runs_page and change("agent_sessions/session", session.pk) in runs_page
    run_page = staff.get(change("runs/run", run.id)).content.decode()
    command = Command.objects.get(run_id=run.id)
    job = RunnerJob.objects.get(run_id=run.id)
    assert change("runs/command", command.id) in run_page
    assert change("runs/runnerjob", str(job.pk)) in run_page
    assert f"/admin/agentrun/webhookdelivery/?run_id={run.id}" in run_page
    assert '<details class="agentrun-json"' in run_page  # payloads pretty and collapsible
    session_page = staff.get(change("agent_sessions/session", session.pk)).content.decode()
    assert change("runs/run", run.id) in session_page
    task = QueueTask.objects.get()
    task_page = staff.get(change("queues/queuetask", task.id)).content.decode()
    task_run = task.latest_attempt["runId"]
    assert change("runs/run", task_run) in task_page
    delivery = WebhookDelivery.objects.filter(run_id=run.id).get()
    delivery_page = staff.get(change("agentrun/webhookdelivery", delivery.pk)).content.decode()
    assert change("runs/run", run.id) in delivery_page
    command_page = staff.get(change("runs/command", command.id)).content.decode()
    assert change("runs/run", run.id) in command_page
