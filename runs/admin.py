"""Operators read runs here; the event log, commands and runner jobs are read-only."""

from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.db.models import OuterRef, Subquery
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from agentrun.adminhtml import READ_ONLY_PAGE, admin_link, changelist_link, json_display, pretty_json
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
    fields = (
        "seq",
        "command_link",
        "type",
        "state",
        "terminal_status",
        "failure_kind",
        "payload_json",
        "acknowledged_at",
        "updated_at",
    )
    readonly_fields = fields
    ordering = ("seq",)

    @admin.display(description="command")
    def command_link(self, command):
        return admin_link("runs_command_change", command.id)

    @admin.display(description="payload")
    def payload_json(self, command):
        return pretty_json(command.payload)


class EventInline(ReadOnlyInline):
    model = RunEvent
    fields = ("seq", "type", "payload_json", "created_at")
    readonly_fields = fields
    ordering = ("seq",)
    verbose_name_plural = f"events (the last {RECENT_EVENTS})"

    @admin.display(description="payload")
    def payload_json(self, event):
        return pretty_json(event.payload)

    def get_queryset(self, request):
        events = super().get_queryset(request)
        run = getattr(request, "_agentrun_run", None)
        if run is not None:
            events = events.filter(seq__gt=run.last_event_seq - RECENT_EVENTS)
        return events


class RunnerJobInline(ReadOnlyInline):
    model = RunnerJob
    fields = ("job_link", "command_id", "attempt_id", "runner_id", "namespace", "job_name", "image", "created_at")
    readonly_fields = fields

    @admin.display(description="runner job")
    def job_link(self, job):
        return admin_link("runs_runnerjob_change", str(job.pk))


JSON_FIELDS = ("session_ref", "resource_bundle_ref", "workspace_ref", "execution_policy", "metadata", "extra")


def _session_title():
    return Subquery(Session.objects.filter(pk=OuterRef("session_id")).values("title")[:1])


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "session_link",
        "tenant_id",
        "project_id",
        "backend_profile",
        "status",
        "failure_kind",
        "claimed_by",
        "created_at",
    )
    list_filter = ("status", "failure_kind", "backend_profile", "tenant_id")
    search_fields = ("id", "session_id")
    ordering = ("-created_at",)
    show_full_result_count = False
    inlines = (CommandInline, EventInline, RunnerJobInline)
    actions = ("cancel_runs",)
    fields = readonly_fields = (
        "session_link",
        "queue_task_link",
        "webhooks_link",
        *(f.name for f in Run._meta.fields if f.name not in JSON_FIELDS),
        *(f"{name}_json" for name in JSON_FIELDS),
    )

    def get_queryset(self, request):
        # The session's title in one query with the runs (a subquery), not one query a row.
        return super().get_queryset(request).annotate(session_title=_session_title())

    @admin.display(description="session", ordering="session_id")
    def session_link(self, run):
        if not run.session_id:
            return "-"
        title = getattr(run, "session_title", None)
        return admin_link(
            "agent_sessions_session_change", run.session_id, f"{title} ({run.session_id})" if title else None
        )

    @admin.display(description="queue task")
    def queue_task_link(self, run):
        return admin_link("queues_queuetask_change", (run.extra or {}).get("queueTaskId"))

    @admin.display(description="webhooks")
    def webhooks_link(self, run):
        if not run.webhook_url:
            return "-"
        return changelist_link("agentrun_webhookdelivery_changelist", f"run_id={run.id}", "deliveries")

    session_ref_json = json_display("session_ref")
    resource_bundle_ref_json = json_display("resource_bundle_ref")
    workspace_ref_json = json_display("workspace_ref")
    execution_policy_json = json_display("execution_policy")
    metadata_json = json_display("metadata")
    extra_json = json_display("extra")

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def change_view(self, request, object_id, form_url="", extra_context=None):
        return super().change_view(request, object_id, form_url, {**READ_ONLY_PAGE, **(extra_context or {})})

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
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((event.seq, event.created_at, event.type, pretty_json(event.payload)) for event in events),
        )
        return format_html(
            "<p>run {}</p><table><tr><th>seq</th><th>at</th><th>type</th><th>payload</th></tr>{}</table>",
            admin_link("runs_run_change", run_id),
            rows,
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


class _ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="run", ordering="run_id")
    def run_link(self, obj):
        return admin_link("runs_run_change", obj.run_id)


@admin.register(Command)
class CommandAdmin(_ReadOnlyAdmin):
    list_display = ("id", "run_link", "seq", "type", "state", "terminal_status", "failure_kind", "updated_at")
    list_filter = ("state", "type", "failure_kind")
    search_fields = ("id", "run__id")
    ordering = ("-updated_at",)
    show_full_result_count = False
    fields = (
        "id",
        "run_link",
        "seq",
        "type",
        "state",
        "terminal_status",
        "failure_kind",
        "failure_message",
        "payload_json",
        "acknowledged_at",
        "created_at",
        "updated_at",
    )
    readonly_fields = fields

    @admin.display(description="payload")
    def payload_json(self, command):
        return pretty_json(command.payload)


@admin.register(RunnerJob)
class RunnerJobAdmin(_ReadOnlyAdmin):
    list_display = ("id", "run_link", "runner_id", "namespace", "job_name", "image", "created_at", "stopped_at")
    list_filter = ("namespace",)
    search_fields = ("run__id", "runner_id", "job_name")
    ordering = ("-created_at",)
    show_full_result_count = False
    fields = (
        "id",
        "run_link",
        "command_id",
        "attempt_id",
        "runner_id",
        "namespace",
        "job_name",
        "image",
        "manager_url",
        "result_json",
        "created_at",
        "updated_at",
        "stopped_at",
    )
    readonly_fields = fields

    @admin.display(description="result")
    def result_json(self, job):
        return pretty_json(job.result)
