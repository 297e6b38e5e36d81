"""The operators' dashboard at /admin/dashboard/: runs by status, queue depth, expiring storage,
recent failures. It lives in queues/ because it reads every app (the layering rule)."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.admin.utils import quote
from django.db.models import Count, Min
from django.template.response import TemplateResponse
from django.urls import path, reverse

from agentrun.clock import db_now
from queues.models import QueueTask, TaskState
from runs.models import Run, RunStatus
from sessions.models import Session

RECENT_FAILED = 20


def dashboard_view(request):
    now = db_now()
    hour = dict(
        Run.objects.filter(created_at__gte=now - timedelta(hours=1)).values_list("status").annotate(n=Count("id"))
    )
    day = dict(
        Run.objects.filter(created_at__gte=now - timedelta(days=1)).values_list("status").annotate(n=Count("id"))
    )
    statuses = [(s, hour.get(s, 0), day.get(s, 0)) for s in RunStatus.values]
    queues = list(
        QueueTask.objects.filter(state=TaskState.PENDING)
        .values("queue")
        .annotate(depth=Count("id"), oldest=Min("created_at"))
        .order_by("queue")
    )
    changelist = reverse("admin:runs_run_changelist")
    failures = [
        (kind, n, f"{changelist}?{urlencode({'failure_kind': kind})}")
        for kind, n in Run.objects.filter(created_at__gte=now - timedelta(days=1), failure_kind__isnull=False)
        .values_list("failure_kind")
        .annotate(n=Count("id"))
        .order_by("-n")
    ]
    expiring = Session.objects.filter(expires_at__gt=now, expires_at__lte=now + timedelta(hours=24)).order_by(
        "expires_at"
    )[:50]
    failed = [
        (run, reverse("admin:runs_run_change", args=[quote(run.id)]))
        for run in Run.objects.filter(status=RunStatus.FAILED).order_by("-created_at")[:RECENT_FAILED]
    ]
    context = {
        **admin.site.each_context(request),
        "title": "Dashboard",
        "statuses": statuses,
        "queues": queues,
        "failures": failures,
        "expiring": expiring,
        "failed": failed,
    }
    return TemplateResponse(request, "admin/agentrun_dashboard.html", context)


def install(site: admin.AdminSite) -> None:
    """Adds /admin/dashboard/ (staff only) to the site and links it from the index."""
    original = site.get_urls

    def get_urls():
        return [path("dashboard/", site.admin_view(dashboard_view), name="agentrun_dashboard"), *original()]

    site.get_urls = get_urls  # type: ignore[method-assign]  # the site keeps its own URLs and adds this one
    site.index_template = "admin/agentrun_index.html"
