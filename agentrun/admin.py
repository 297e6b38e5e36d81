"""Django admin for API keys (create one, shown once; revoke with an action) and webhook
deliveries (see what was sent and how it went; resend with an action)."""

from django.contrib import admin, messages
from django.utils import timezone

from agentrun import webhooks
from agentrun.adminhtml import admin_link, pretty_json
from agentrun.auth import api_key_create, api_key_revoke
from agentrun.errors import AgentRunError
from agentrun.models import ApiKey, WebhookDelivery


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = (
        "prefix",
        "name",
        "tenant_id",
        "project_id",
        "role",
        "run_id",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    )
    list_filter = ("role", "tenant_id")
    search_fields = ("prefix", "name", "tenant_id", "project_id", "run_id")
    fields = (
        "name",
        "tenant_id",
        "project_id",
        "role",
        "run_id",
        "expires_at",
        "prefix",
        "created_at",
        "last_used_at",
        "revoked_at",
    )
    readonly_fields = ("prefix", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke",)

    def get_readonly_fields(self, request, obj=None):
        if obj is not None:
            return self.fields
        return self.readonly_fields

    def save_model(self, request, obj, form, change):
        if change:
            return
        expires_in = obj.expires_at - timezone.now() if obj.expires_at is not None else None
        try:
            key, raw = api_key_create(
                tenant_id=obj.tenant_id,
                project_id=obj.project_id,
                role=obj.role,
                run_id=obj.run_id,
                name=obj.name,
                expires_in=expires_in,
            )
        except AgentRunError as exc:
            self.message_user(request, f"No key was created: {exc.message}", messages.ERROR)
            return
        obj.pk, obj.expires_at = key.pk, key.expires_at
        obj.prefix, obj.key_hash, obj.created_at = key.prefix, key.key_hash, key.created_at
        self.message_user(request, f"New API key (shown once, copy it now): {raw}", messages.WARNING)

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset):
        count = api_key_revoke(key_ids=queryset.values_list("pk", flat=True))
        self.message_user(request, f"Revoked {count} keys.")


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "event_type",
        "state",
        "tenant_id",
        "url",
        "attempts",
        "last_status_code",
        "next_attempt_at",
        "created_at",
        "run_link",
        "task_link",
    )
    list_filter = ("state", "event_type", "tenant_id")
    search_fields = ("id", "run_id", "task_id", "url", "tenant_id")
    ordering = ("-created_at",)
    actions = ("resend",)
    fields = (
        "id",
        "event_type",
        "state",
        "tenant_id",
        "url",
        "run_link",
        "task_link",
        "attempts",
        "last_status_code",
        "last_error",
        "next_attempt_at",
        "created_at",
        "delivered_at",
        "body_pretty",
    )
    readonly_fields = fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="run")
    def run_link(self, obj):
        return admin_link("runs_run_change", obj.run_id)

    @admin.display(description="queue task")
    def task_link(self, obj):
        return admin_link("queues_queuetask_change", obj.task_id)

    @admin.display(description="body")
    def body_pretty(self, obj):
        return pretty_json(obj.body)

    @admin.action(description="Resend selected deliveries now")
    def resend(self, request, queryset):
        count = webhooks.resend(delivery_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} deliveries will be sent again.")
