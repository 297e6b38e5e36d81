"""Operators read runs here; the event log, commands and runner jobs are read-only."""

import json

from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from runs import services
from runs.models import Command, ResourceBundle, Run, RunEvent, RunnerJob
from sessions.admin import SessionAdmin
from sessions.models import Session

# The change page shows the tail of the event log, not all of it.
RECENT_EVENTS = 50
RECENT_RUNS = 20


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class CommandInline(ReadOnlyInline):
    model = Command
    fields = ("seq", "id", "type", "state", "terminal_status", "failure_kind", "acknowledged_at", "updated_at")
    readonly_fields = fields
    ordering = ("seq",)


class EventInline(ReadOnlyInline):
    model = RunEvent
    fields = ("seq", "type", "payload", "created_at")
    readonly_fields = fields
    ordering = ("seq",)
    verbose_name_plural = f"events (the last {RECENT_EVENTS})"

    def get_queryset(self, request):
        events = super().get_queryset(request)
        run = getattr(request, "_agentrun_run", None)
        if run is not None:
            events = events.filter(seq__gt=run.last_event_seq - RECENT_EVENTS)
        return events


class RunnerJobInline(ReadOnlyInline):
    model = RunnerJob
    fields = ("id", "command_id", "attempt_id", "runner_id", "namespace", "job_name", "image", "created_at")
    readonly_fields = fields


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = ("id", "tenant_id", "project_id", "backend_profile", "status", "claimed_by", "created_at")
    list_filter = ("status", "failure_kind", "backend_profile", "tenant_id")
    search_fields = ("id",)
    ordering = ("-created_at",)
    inlines = (CommandInline, EventInline, RunnerJobInline)
    actions = ("cancel_runs",)
    readonly_fields = [f.name for f in Run._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_object(self, request, object_id, from_field=None):
        run = super().get_object(request, object_id, from_field)
        request._agentrun_run = run
        return run

    @admin.action(description="Cancel selected runs")
    def cancel_runs(self, request, queryset):
        cancelled = 0
        for run_id in queryset.values_list("id", flat=True):
            run = services.run_cancel(run_id=run_id, reason=f"cancelled by operator {request.user}")
            cancelled += run.status == "cancelled"
        self.message_user(request, f"Cancelled {cancelled} runs.", messages.SUCCESS)


class SessionWithRunsAdmin(SessionAdmin):
    """The session page with what runs own: the session's runs and its current run's last events."""

    fieldsets = (*SessionAdmin.fieldsets, ("Runs and events", {"fields": ("runs", "recent_events")}))
    readonly_fields = [*SessionAdmin.readonly_fields, "runs", "recent_events"]

    @admin.display(description="runs (newest first)")
    def runs(self, session):
        runs = Run.objects.filter(session_id=session.session_id).order_by("-created_at")[:RECENT_RUNS]
        rows = format_html_join(
            "",
            "<tr><td><a href='{}'>{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    reverse("admin:runs_run_change", args=[quote(run.id)]),
                    run.id,
                    run.status,
                    run.claimed_by or "",
                    run.created_at,
                )
                for run in runs
            ),
        )
        return (
            format_html(
                "<table><tr><th>run</th><th>status</th><th>claimed by</th><th>created</th></tr>{}</table>", rows
            )
            if runs
            else "none"
        )

    @admin.display(description=f"events of the active or last run (the last {RECENT_EVENTS})")
    def recent_events(self, session):
        run_id = session.active_run_id or session.last_run_id
        if run_id is None:
            return "none"
        events = list(RunEvent.objects.filter(run_id=run_id).order_by("-seq")[:RECENT_EVENTS])[::-1]
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            ((event.seq, event.created_at, event.type, json.dumps(event.payload)[:300]) for event in events),
        )
        return format_html(
            "<p>run {}</p><table><tr><th>seq</th><th>at</th><th>type</th><th>payload</th></tr>{}</table>", run_id, rows
        )


admin.site.unregister(Session)
admin.site.register(Session, SessionWithRunsAdmin)


@admin.register(ResourceBundle)
class ResourceBundleAdmin(admin.ModelAdmin):
    """Operators manage the bundles here. A bundle names secrets and their keys; the values stay
    in the secret store (a Kubernetes Secret, or `var/secrets/` for the local launcher)."""

    list_display = ("name", "tenant_id", "is_default", "variables", "image", "cpu", "memory", "runtime_class_name")
    list_filter = ("is_default",)
    search_fields = ("name", "tenant_id")
    ordering = ("tenant_id", "name")
    readonly_fields = ("created_at", "updated_at")
    fieldsets = (
        (None, {"fields": ("tenant_id", "name", "is_default")}),
        ("Environment (secret references only)", {"fields": ("env", "env_from")}),
        ("Sandbox", {"fields": ("image", "cpu", "memory", "runtime_class_name", "node_selector", "egress_allowlist")}),
        (None, {"fields": ("created_at", "updated_at")}),
    )

    @admin.display(description="variables")
    def variables(self, bundle):
        names = [item.get("name", "?") for item in bundle.env if isinstance(item, dict)]
        names += [f"{secret}/*" for secret in bundle.env_from]
        return ", ".join(names) or "none"
