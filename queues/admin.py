"""Operators watch queue tasks and their attempts here, cancel or retry them, and tune queues."""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.urls import reverse
from django.utils.html import format_html

from agentrun.adminhtml import READ_ONLY_PAGE, admin_link, changelist_link, json_display
from agentrun.errors import AgentRunError
from queues import dashboard, services
from queues.models import Queue, QueueAttempt, QueueTask, TenantLimit, TenantRetention


class AttemptInline(admin.TabularInline):
    model = QueueAttempt
    extra = 0
    can_delete = False
    fields = (
        "number",
        "state",
        "run_link",
        "command_id",
        "failure_kind",
        "failure_message",
        "started_at",
        "finished_at",
    )
    readonly_fields = fields
    ordering = ("number",)

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="run")
    def run_link(self, attempt):
        if not attempt.run_id:
            return "-"
        return format_html(
            "<a href='{}'>{}</a>", reverse("admin:runs_run_change", args=[quote(attempt.run_id)]), attempt.run_id
        )


TASK_JSON = ("payload", "metadata", "references", "session_ref", "workspace_ref", "execution_policy", "latest_attempt")


@admin.register(QueueTask)
class QueueTaskAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "title",
        "tenant_id",
        "queue",
        "lane",
        "priority",
        "state",
        "attempt_count",
        "latest_run",
        "updated_at",
    )
    list_filter = ("queue", "lane", "state", "tenant_id")
    search_fields = ("id", "title")
    ordering = ("-updated_at",)
    show_full_result_count = False
    inlines = (AttemptInline,)
    actions = ("cancel_tasks", "retry_tasks")
    fields = readonly_fields = (
        "latest_run",
        "webhooks_link",
        *(f.name for f in QueueTask._meta.fields if f.name not in TASK_JSON),
        *(f"{name}_json" for name in TASK_JSON),
    )
    payload_json = json_display("payload")
    metadata_json = json_display("metadata")
    references_json = json_display("references")
    session_ref_json = json_display("session_ref")
    workspace_ref_json = json_display("workspace_ref")
    execution_policy_json = json_display("execution_policy")
    latest_attempt_json = json_display("latest_attempt")

    @admin.display(description="latest run")
    def latest_run(self, task):
        return admin_link("runs_run_change", (task.latest_attempt or {}).get("runId"))

    @admin.display(description="webhooks")
    def webhooks_link(self, task):
        if not task.webhook_url:
            return "-"
        return changelist_link("agentrun_webhookdelivery_changelist", f"task_id={task.id}", "deliveries")

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def change_view(self, request, object_id, form_url="", extra_context=None):
        return super().change_view(request, object_id, form_url, {**READ_ONLY_PAGE, **(extra_context or {})})

    @admin.action(description="Cancel selected tasks (and their runs)")
    def cancel_tasks(self, request, queryset):
        for task_id in queryset.values_list("id", flat=True):
            services.task_cancel(task_id=task_id, reason=f"cancelled by operator {request.user}")
        self.message_user(request, f"Cancelled {queryset.count()} task(s).", messages.SUCCESS)

    @admin.action(description="Retry selected failed, blocked or cancelled tasks")
    def retry_tasks(self, request, queryset):
        retried = 0
        for task_id in queryset.values_list("id", flat=True):
            try:
                services.task_retry(task_id=task_id)
                retried += 1
            except AgentRunError as error:
                self.message_user(request, f"{task_id}: {error.message}", messages.WARNING)
        self.message_user(request, f"Sent {retried} task(s) back to their queue.", messages.SUCCESS)


@admin.register(Queue)
class QueueAdmin(admin.ModelAdmin):
    list_display = ("tenant_id", "name", "max_running", "paused")
    list_editable = ("max_running", "paused")
    list_filter = ("paused", "tenant_id")
    search_fields = ("name", "tenant_id")


@admin.register(TenantLimit)
class TenantLimitAdmin(admin.ModelAdmin):
    list_display = ("tenant_id", "max_running")
    list_editable = ("max_running",)


@admin.register(TenantRetention)
class TenantRetentionAdmin(admin.ModelAdmin):
    list_display = ("tenant_id", "retention_days")
    list_editable = ("retention_days",)


dashboard.install(admin.site)
